package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/steppe/steppe/internal/progress"
)

// progressOutput is where a command's progress goes, f, shown as the
// -progress flag says (auto: live on a terminal, plain lines elsewhere),
// else STEPPE_PROGRESS, else auto. The flag sets the mode while the
// command line is parsed, before anything is printed.
func progressOutput(fs *flag.FlagSet, f *os.File) *progress.Reporter {
	m, err := progress.ParseMode(os.Getenv("STEPPE_PROGRESS"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "steppe: STEPPE_PROGRESS: %v; using auto\n", err)
	}
	rep := progress.New(f, m)
	fs.Func("progress", "how progress is shown: auto (live on a terminal, else plain), plain (lines) or tty (env STEPPE_PROGRESS)", func(s string) error {
		m, err := progress.ParseMode(s)
		if err != nil {
			return err
		}
		rep.SetMode(m)
		return nil
	})
	return rep
}

// closeProgress ends the live lines of a command's progress output.
func closeProgress(w io.Writer) {
	if r, ok := w.(*progress.Reporter); ok {
		r.Close()
	}
}
