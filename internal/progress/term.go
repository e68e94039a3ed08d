package progress

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Mode is how a Reporter shows tasks.
type Mode int

const (
	// Auto is Terminal on a terminal whose TERM is not "dumb", else Plain;
	// Choose resolves it.
	Auto Mode = iota
	// Plain prints lines only: what scripts and logs read.
	Plain
	// Terminal redraws one live line per task in place.
	Terminal
)

func (m Mode) String() string {
	switch m {
	case Plain:
		return "plain"
	case Terminal:
		return "tty"
	default:
		return "auto"
	}
}

// ParseMode reads "auto", "plain" or "tty" (the -progress flag and
// STEPPE_PROGRESS).
func ParseMode(s string) (Mode, error) {
	switch s {
	case "", "auto":
		return Auto, nil
	case "plain":
		return Plain, nil
	case "tty":
		return Terminal, nil
	}
	return Auto, fmt.Errorf("progress mode %q: want auto, plain or tty", s)
}

// Choose resolves Auto for output to f: Terminal when f is a terminal and
// TERM (term) is set and not "dumb", which cannot move the cursor.
func Choose(m Mode, f *os.File, term string) Mode {
	if m != Auto {
		return m
	}
	if term != "" && term != "dumb" && IsTerminal(f) {
		return Terminal
	}
	return Plain
}

// IsTerminal says whether f is a terminal (its termios can be read).
func IsTerminal(f *os.File) bool {
	if f == nil {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// terminalWidth is f's width in columns, 0 when it cannot tell.
func terminalWidth(f *os.File) int {
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil {
		return 0
	}
	return int(ws.Col)
}
