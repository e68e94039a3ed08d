// Command brokensteppe is a steppe binary that fails as an agent, for the
// self-upgrade tests: it answers `version` as steppe does (with the
// version stamped in: -ldflags "-X main.version=V -X main.mode=M"), so it
// passes the check before the exec; then, run as the agent, it exits 1 at
// once (mode "exit") or runs and never answers (mode "hang").
package main

import (
	"fmt"
	"os"
	"time"
)

var version, mode string

func main() {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println("steppe " + version)
		return
	}
	fmt.Fprintf(os.Stderr, "brokensteppe %s (%s): started as %q\n", version, mode, os.Args)
	if mode == "hang" {
		for {
			time.Sleep(time.Hour)
		}
	}
	os.Exit(1)
}
