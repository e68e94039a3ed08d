// Package artifact makes HashiCorp-style releases of daemon binaries and
// installs verified copies of them: the operator's side builds static
// binaries from Go module sources and publishes them, signed, into a store
// laid out like releases.hashicorp.com; the agent's side fetches a binary
// from such a store (or a pinned URL), checks the signed SHA256SUMS and the
// archive's digest, and installs it into a cache by digest.
//
// The files split by side, so that the agent's trust path can be read on
// its own:
//
//   - Both sides (the contract between them): layout.go (the store's
//     layout and file names, version syntax, SHA256SUMS), cache.go (the
//     cache directory both default to).
//   - The operator's side: build.go, buildcache.go, gotool.go, resolve.go,
//     check.go, products.go, files.go (building from source); store.go,
//     sign.go (publishing and signing); serve.go (serving a store).
//   - The agent's side: fetch.go (the release flow and its HTTP), install.go
//     (the cache by digest), keyring.go (trusted keys, signature checks).
//
// The agent's side takes nothing from a store but what the signed
// SHA256SUMS vouches for: every name it requests is derived from product,
// version, OS and architecture, never read from the store's unsigned
// index.json.
package artifact
