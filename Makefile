# The README's two commands live here so that CI and people run the same thing.
GO ?= go
# staticcheck is a tool of the module (go.mod's tool directive): nothing to
# install by hand.
STATICCHECK ?= $(GO) tool staticcheck
# Every test runs where nothing can leave the machine (scripts/offline).
OFFLINE ?= scripts/offline

.PHONY: build test check artifacts unit race fuzz

# steppe itself is static and stripped: it is baked into machine images.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o bin/steppe ./cmd/steppe

# check: formatting, vet and staticcheck, before any test runs.
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

# artifacts: every HashiCorp binary the end-to-end tests need, built from
# source into the cache (instant when cached).
artifacts: build
	./scripts/prepare-artifacts

unit:
	$(OFFLINE) $(GO) test -count=1 -timeout 20m ./...

# race: the packages with the most concurrency, under the race detector.
RACE_PKGS ?= ./internal/supervise ./internal/agent ./internal/bundle
race:
	$(OFFLINE) $(GO) test -race -count=1 -timeout 30m $(RACE_PKGS)

# fuzz: a short run of every fuzz target (the parsers of untrusted input).
# The budgets are execution counts, about 10 s each on 2 cores, not
# durations: with a duration, Go 1.26's fuzz coordinator can report its own
# -fuzztime deadline as a failure (golang/go#75804, fixed in Go 1.27).
FUZZ_MANIFEST ?= 100000x
FUZZ_UNPACK ?= 60000x
FUZZ_EXECUTE ?= 200000x
fuzz:
	$(OFFLINE) $(GO) test -run '^$$' -fuzz '^FuzzManifest$$' -fuzztime $(FUZZ_MANIFEST) ./internal/bundle
	$(OFFLINE) $(GO) test -run '^$$' -fuzz '^FuzzUnpack$$' -fuzztime $(FUZZ_UNPACK) ./internal/bundle
	$(OFFLINE) $(GO) test -run '^$$' -fuzz '^FuzzExecute$$' -fuzztime $(FUZZ_EXECUTE) ./internal/render

# test: everything CI runs.
test: check artifacts fuzz race
	$(OFFLINE) $(GO) test -count=1 -timeout 60m ./...
