package supervise

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
)

// The record is written durably: the temporary file is synced before it
// is renamed over record.json, and the directory after, so a power loss
// cannot leave an empty record or lose a rename (as a plain write and
// rename can). Seen with strace on a real agent.
func TestRecordWrittenDurably(t *testing.T) {
	opts := testOptions(t)
	dir := t.TempDir()
	cfg := agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Once: true,
		Specs: []Spec{{Name: "rec", Command: "/bin/sleep", Args: []string{"1000"}}}, StatusFile: filepath.Join(dir, "status.json")}
	b, _ := json.Marshal(cfg)
	path := filepath.Join(dir, "agent.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	lines := testenv.Strace(t, "fsync,fdatasync,rename,renameat,renameat2", []string{"STEPPE_TEST_AGENT=" + path}, "-test.run=^$")
	svcDir := filepath.Join(opts.StateDir, "rec")
	record := filepath.Join(svcDir, "record.json")
	// Every rename onto record.json: its source synced before, the
	// directory synced after.
	rename := regexp.MustCompile(`rename(?:at2?)?\((?:[^,]+, )?"([^"]+)", (?:[^,]+, )?"([^"]+)"`)
	fsync := regexp.MustCompile(`f(?:data)?sync\(\d+<([^>]+)>`)
	renames := 0
	var synced []string // paths fsynced so far
	for i, line := range lines {
		if m := fsync.FindStringSubmatch(line); m != nil {
			synced = append(synced, m[1])
			continue
		}
		m := rename.FindStringSubmatch(line)
		if m == nil || m[2] != record {
			continue
		}
		renames++
		if !slices.Contains(synced, m[1]) {
			t.Errorf("%s renamed over the record without an fsync first:\n%s", m[1], strings.Join(lines[max(0, i-5):i+1], "\n"))
		}
		dirSynced := false
		for _, next := range lines[i+1:] {
			if strings.Contains(next, "fsync(") && strings.Contains(next, "<"+svcDir+">") {
				dirSynced = true
				break
			}
			if rename.MatchString(next) {
				break
			}
		}
		if !dirSynced {
			t.Errorf("the rename of %s is not followed by an fsync of %s", m[1], svcDir)
		}
	}
	if renames == 0 {
		t.Fatalf("no record written under strace:\n%s", strings.Join(lines, "\n"))
	}
}
