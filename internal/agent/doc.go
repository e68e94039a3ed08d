// Package agent is the machine loop: it pulls its role's signed bundle,
// verifies it, renders its templates, fetches its artifacts, applies the
// release to the supervised services and reports how the machine runs
// through a local API (the internal/agent line of DESIGN.md's layout).
//
// Its parts:
//
//   - agent.go: Run, the agent's life: boot config, supervisor, first
//     apply of the last good release, SIGHUP reloads, shutdown. Every
//     apply hands the supervisor the whole set (the machine's own services
//     and the running release's).
//   - config.go: the boot config (agent, machine, bundle, artifacts and
//     service blocks) and the service files of bundles, parsed with every
//     error's file:line:column.
//   - pull.go: the pull loop: long-poll the store, unpack and verify
//     (internal/bundle), render (internal/render), fetch artifacts
//     (internal/artifact), apply, gate on readiness, then commit or roll
//     back to the last good release; a download that fails is tried again
//     with backoff, a bundle refused for what it is waits for a new publish.
//   - api.go: the local API on a root-only Unix socket (status, logs,
//     start, stop, restart, reload) and its Client, used by steppe agent.
//   - pages.go: gives back the pages of the binary that only start-up used,
//     which keeps the agent's resident memory small.
package agent
