# The README's two commands live here so that CI and people run the same thing.
GO ?= go
STATICCHECK ?= $(shell go env GOPATH)/bin/staticcheck

.PHONY: build test check artifacts unit fuzz

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
	$(GO) test -count=1 -timeout 20m ./...

# fuzz: a short run of every fuzz target (the parsers of untrusted input).
# The budgets are execution counts, about 10 s each on 2 cores, not
# durations: with a duration, Go 1.26's fuzz coordinator can report its own
# -fuzztime deadline as a failure (golang/go#75804, fixed in Go 1.27).
FUZZ_MANIFEST ?= 100000x
FUZZ_UNPACK ?= 60000x
FUZZ_EXECUTE ?= 200000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzManifest$$' -fuzztime $(FUZZ_MANIFEST) ./internal/bundle
	$(GO) test -run '^$$' -fuzz '^FuzzUnpack$$' -fuzztime $(FUZZ_UNPACK) ./internal/bundle
	$(GO) test -run '^$$' -fuzz '^FuzzExecute$$' -fuzztime $(FUZZ_EXECUTE) ./internal/render

# test: everything CI runs.
test: check artifacts fuzz
	$(GO) test -count=1 -timeout 60m ./...
