package cluster

import (
	"log/slog"
)

// Secret is a value that must never reach a log line, a status output or a
// bundle: every printing path (fmt verbs, slog, JSON, text marshalling)
// shows "[redacted]". Reveal is the only way to the value, so each use is
// visible in review.
type Secret string

const redacted = "[redacted]"

// Reveal returns the secret value.
func (s Secret) Reveal() string { return string(s) }

// String redacts.
func (s Secret) String() string { return redacted }

// GoString redacts (%#v).
func (s Secret) GoString() string { return redacted }

// LogValue redacts for log/slog.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText redacts for encoding/json and friends; secrets are persisted
// through Reveal only.
func (s Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
