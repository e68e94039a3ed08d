package deploy

import (
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/cluster"
)

func TestBeginRotation(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	r, resumed, err := beginRotation(nil, RotateCerts, now)
	if err != nil || resumed || r.Kind != RotateCerts || !r.Started.Equal(now) {
		t.Fatalf("first: %+v %v %v", r, resumed, err)
	}
	r.Done = append(r.Done, "certs/c-server-1")
	dir := t.TempDir()
	if err := r.save(dir); err != nil {
		t.Fatal(err)
	}
	prev, err := loadRotation(dir)
	if err != nil {
		t.Fatal(err)
	}
	// Killed, then run again: the same record, its start and steps kept.
	again, resumed, err := beginRotation(prev, RotateCerts, now.Add(time.Hour))
	if err != nil || !resumed || !again.Started.Equal(now) || !again.done("certs/c-server-1") || again.done("certs/c-server-2") {
		t.Fatalf("resume: %+v %v %v", again, resumed, err)
	}
	if _, _, err := beginRotation(prev, RotateGossip, now); err == nil || !strings.Contains(err.Error(), "steppe rotate certs") {
		t.Fatalf("another kind over an unfinished rotation: %v", err)
	}
	prev.Finished = now.Add(time.Minute)
	fresh, resumed, err := beginRotation(prev, RotateGossip, now.Add(time.Hour))
	if err != nil || resumed || len(fresh.Done) != 0 || fresh.Kind != RotateGossip {
		t.Fatalf("after a finished one: %+v %v %v", fresh, resumed, err)
	}
	if r, err := loadRotation(t.TempDir()); r != nil || err != nil {
		t.Fatalf("no record: %v %v", r, err)
	}
}

func TestExpiryProblems(t *testing.T) {
	now := time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	certs := []cluster.CertInfo{
		{Name: "CA", CA: true, NotAfter: now.Add(3650 * day)},
		{Name: "operator", NotAfter: now.Add(20 * day)},
		{Name: "c-server-1", NotAfter: now.Add(29*day + 23*time.Hour)},
		{Name: "c-server-2", NotAfter: now.Add(30 * day)},
		{Name: "c-default-1", NotAfter: now.Add(-day)},
	}
	got := expiryProblems(certs, now, cluster.ExpiryWarning)
	if len(got) != 3 {
		t.Fatalf("problems %q, want the operator's, c-server-1's and c-default-1's", got)
	}
	for i, want := range []string{"the operator's certificate expires in 20 days", "machine c-server-1 expires in 29 days", "machine c-default-1 expired on 2025-02-28"} {
		if !strings.Contains(got[i], want) || !strings.Contains(got[i], "steppe rotate certs") {
			t.Errorf("problem %d %q: want %q and the command", i, got[i], want)
		}
	}
	got = expiryProblems([]cluster.CertInfo{{Name: "CA", CA: true, NotAfter: now.Add(10 * day)}}, now, cluster.ExpiryWarning)
	if len(got) != 1 || !strings.Contains(got[0], "does not renew the CA") {
		t.Fatalf("CA: %q", got)
	}
}
