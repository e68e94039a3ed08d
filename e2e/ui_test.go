package e2e

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/testenv"
)

// uiJob is a service job with a name no UI text holds by chance, and a
// Consul service of another such name.
const (
	uiJobName     = "steppe-uijob"
	uiServiceName = "steppe-uisvc"
	uiJob         = `job "steppe-uijob" {
  datacenters = ["dc1"]
  group "g" {
    service {
      name     = "steppe-uisvc"
      provider = "consul"
    }
    task "sleep" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }
      resources {
        cpu    = 20
        memory = 16
      }
    }
  }
}
`
)

// TestUIsInBrowser opens both web UIs in a real browser, Debian's
// chromium (headless), whose only trust beyond its built-in roots is the
// cluster CA in an NSS database, as `steppe up` tells an operator to set
// up: Nomad's job list after logging in on its token page shows the job,
// Consul's services page shows its service. The same browser with an
// empty NSS database gets a certificate error and sees neither. The
// screenshots are kept (STEPPE_TEST_ARTIFACTS, else e2e/artifacts).
func TestUIsInBrowser(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		testenv.Lacks(t, "chromium is not installed (apt-get install chromium)")
	}
	certutil, err := exec.LookPath("certutil")
	if err != nil {
		testenv.Lacks(t, "certutil is not installed (apt-get install libnss3-tools)")
	}
	consul, nomad := daemonBinaries(t)
	c := newSpecCluster(t, consul, nomad, `name = "e2eui"`+"\n", "127.0.3", 11, 5)
	out, took := c.up()
	t.Logf("steppe up took %v", took.Round(time.Millisecond))
	if !strings.Contains(out, "trust the cluster CA") {
		t.Errorf("up does not say how to trust the CA in a browser:\n%s", out)
	}
	env := c.envMap()
	job := filepath.Join(c.dir, "ui.nomad.hcl")
	if err := os.WriteFile(job, []byte(uiJob), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.sh("nomad job run -detach " + job); err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
	waitUntil(t, uiServiceName+" registered in Consul", 2*time.Minute, func() bool {
		out, err := c.sh("consul catalog services")
		return err == nil && strings.Contains(out, uiServiceName+"\n")
	})

	arts := artifactsDir(t)
	nomadJobs := env["NOMAD_ADDR"] + "/ui/jobs"
	consulServices := fmt.Sprintf("%s/ui/%s/services", env["CONSUL_HTTP_ADDR"], cluster.DefaultDatacenter)
	ctx := t.Context()

	// Untrusted: an empty NSS database. The browser refuses the
	// cluster's certificate, so neither name can appear.
	{
		b := startBrowser(t, chromium, nssHome(t, certutil, ""), arts, "untrusted")
		for _, u := range []struct{ label, url, name string }{{"nomad", nomadJobs, uiJobName}, {"consul", consulServices, uiServiceName}} {
			errText, err := b.navigate(ctx, u.url)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second) // what an error page shows is there at once
			text := b.text(ctx)
			shot := b.screenshot(ctx, u.label)
			if !strings.Contains(errText, "ERR_CERT_AUTHORITY_INVALID") && !strings.Contains(text, "ERR_CERT_AUTHORITY_INVALID") {
				t.Errorf("%s with an empty NSS database: no certificate error (navigation error %q); page text %.300q; screenshot %s", u.url, errText, text, shot)
			}
			if strings.Contains(text, u.name) {
				t.Errorf("%s with an empty NSS database shows %s", u.url, u.name)
			}
			t.Logf("untrusted: %s refused (%s); screenshot %s", u.url, errText, shot)
		}
		b.close()
	}

	b := startBrowser(t, chromium, nssHome(t, certutil, env["NOMAD_CACERT"]), arts, "trusted")
	// Without a token Nomad's job list is refused: the login below is
	// what shows the job.
	if errText, err := b.navigate(ctx, nomadJobs); err != nil || errText != "" {
		t.Fatalf("navigate %s trusting the cluster CA: %v %s", nomadJobs, err, errText)
	}
	text := b.waitText(ctx, "Nomad's job list to refuse a browser without a token", nomadJobs, "Not Authorized", time.Minute)
	if strings.Contains(text, uiJobName) {
		t.Errorf("Nomad's UI lists %s without a token", uiJobName)
	}
	shot := b.screenshot(ctx, "nomad-jobs-no-token")
	t.Logf("nomad UI without a token: Not Authorized; screenshot %s", shot)

	// Log in as a person does: the token page (which shows Nomad's
	// anonymous token, with a sign-out button, until one signs in), the
	// Secret ID typed into its field, the sign-in button. (A production
	// build of the UI has no data-test attributes: buttons are found by
	// their text.)
	tokens := env["NOMAD_ADDR"] + "/ui/settings/tokens"
	if errText, err := b.navigate(ctx, tokens); err != nil || errText != "" {
		t.Fatalf("navigate %s: %v %s", tokens, err, errText)
	}
	const button = `[...document.querySelectorAll("button")].find(b => b.innerText.trim() === %q)`
	b.waitJS(ctx, "the token page", tokens, fmt.Sprintf(`!!document.querySelector("#token-input") || !!`+button, "Sign Out"), time.Minute)
	b.eval(ctx, fmt.Sprintf(`(b => b && b.click())(`+button+`)`, "Sign Out"))
	b.waitJS(ctx, "the token field", tokens, `!!document.querySelector("#token-input")`, time.Minute)
	b.eval(ctx, `document.querySelector("#token-input").focus()`)
	if _, err := b.call(ctx, "Input.insertText", map[string]any{"text": env["NOMAD_TOKEN"]}); err != nil {
		t.Fatalf("type the token: %v", err)
	}
	signIn := fmt.Sprintf(button, "Sign in with secret")
	b.waitJS(ctx, "the sign-in button enabled", tokens, `(b => !!b && !b.disabled)(`+signIn+`)`, 30*time.Second)
	b.eval(ctx, signIn+`.click()`)
	text = b.waitText(ctx, "Token Authenticated", tokens, "Token Authenticated", time.Minute)
	name := ""
	if m := regexp.MustCompile(`Token: (.+)`).FindStringSubmatch(text); m != nil {
		name = strings.TrimSpace(m[1])
	}
	shot = b.screenshot(ctx, "nomad-signed-in")
	if name == "" || strings.Contains(name, "Anonymous") {
		t.Errorf("nomad UI after signing in shows token %q; screenshot %s", name, shot)
	}
	t.Logf("nomad UI: signed in (token %q); screenshot %s", name, shot)

	if errText, err := b.navigate(ctx, nomadJobs); err != nil || errText != "" {
		t.Fatalf("navigate %s: %v %s", nomadJobs, err, errText)
	}
	b.waitText(ctx, "Nomad's job list to show "+uiJobName, nomadJobs, uiJobName, time.Minute)
	shot = b.screenshot(ctx, "nomad-jobs")
	t.Logf("nomad UI %s shows %s; screenshot %s", nomadJobs, uiJobName, shot)

	if errText, err := b.navigate(ctx, consulServices); err != nil || errText != "" {
		t.Fatalf("navigate %s trusting the cluster CA: %v %s", consulServices, err, errText)
	}
	b.waitText(ctx, "Consul's services page to show "+uiServiceName, consulServices, uiServiceName, time.Minute)
	shot = b.screenshot(ctx, "consul-services")
	t.Logf("consul UI %s shows %s; screenshot %s", consulServices, uiServiceName, shot)
	b.close()
}

// artifactsDir is where a test keeps what a person may want to look at
// afterwards (screenshots, browser logs): $STEPPE_TEST_ARTIFACTS/<test>,
// else e2e/artifacts/<test> (ignored by git). It outlives the test.
func artifactsDir(t *testing.T) string {
	t.Helper()
	root := os.Getenv("STEPPE_TEST_ARTIFACTS")
	if root == "" {
		root = "artifacts" // the tests run in e2e/
	}
	dir, err := filepath.Abs(filepath.Join(root, strings.ReplaceAll(t.Name(), "/", "_")))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("test artifacts: %v", err)
	}
	return dir
}

// nssHome is a HOME whose NSS database (where chromium on Linux looks for
// certificates a user trusts) holds only the CA in caFile, or nothing
// when caFile is "".
func nssHome(t *testing.T, certutil, caFile string) string {
	t.Helper()
	home := t.TempDir()
	db := filepath.Join(home, ".pki", "nssdb")
	if err := os.MkdirAll(db, 0o700); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		out, err := exec.Command(certutil, append([]string{"-d", "sql:" + db}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("certutil %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("-N", "--empty-password")
	if caFile != "" {
		// C: a trusted CA for TLS servers.
		run("-A", "-n", "steppe-ca", "-t", "C,,", "-i", caFile)
	}
	t.Logf("NSS database %s:\n%s", db, strings.TrimSpace(run("-L")))
	return home
}

// browser is a headless chromium driven over the Chrome DevTools
// Protocol on a pipe (--remote-debugging-pipe: commands on its fd 3,
// answers on its fd 4, each a JSON message ended by a NUL byte), so that
// it listens on no port. It has one page, attached as a flat session.
type browser struct {
	t       *testing.T
	cmd     *exec.Cmd
	w       *os.File
	exited  chan struct{}
	dir     string // artifacts
	name    string
	session string

	mu      sync.Mutex
	next    int
	waiting map[int]chan cdpMessage
	closed  bool
}

type cdpMessage struct {
	ID     int             `json:"id,omitempty"`
	Method string          `json:"method,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
	SessionID string `json:"sessionId,omitempty"`
}

// startBrowser runs chromium with HOME (and so its NSS database) home.
// Its background networking is off: the only addresses it is given are
// the cluster's, on loopback, and scripts/offline gives it no other
// route anyway.
func startBrowser(t *testing.T, chromium, home, arts, name string) *browser {
	t.Helper()
	cmdR, cmdW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(arts, "chromium-"+name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(chromium,
		"--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--remote-debugging-pipe",
		"--user-data-dir="+filepath.Join(home, "chromium"),
		"--window-size=1280,900",
		"--disable-background-networking", "--no-first-run", "--disable-component-update",
		"--disable-sync", "--disable-default-apps", "--no-default-browser-check",
		"--disable-extensions", "--disable-breakpad", "--metrics-recording-only",
		"about:blank")
	cmd.Env = []string{"HOME=" + home, "PATH=/usr/local/bin:/usr/bin:/bin"}
	cmd.ExtraFiles = []*os.File{cmdR, outW} // fd 3, fd 4
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: chromium's helpers (zygote, renderers) go
	// with it at the end.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	cmdR.Close()
	outW.Close()
	b := &browser{t: t, cmd: cmd, w: cmdW, exited: make(chan struct{}), dir: arts, name: name, waiting: map[int]chan cdpMessage{}}
	go func() {
		cmd.Wait()
		close(b.exited)
	}()
	go b.read(outR)
	t.Cleanup(b.close)
	t.Logf("chromium (%s) pid %d, log %s", name, cmd.Process.Pid, logPath)

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	res, err := b.callIn(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank"})
	if err != nil {
		t.Fatalf("chromium: new page: %v", err)
	}
	var target struct {
		TargetID string `json:"targetId"`
	}
	json.Unmarshal(res, &target)
	res, err = b.callIn(ctx, "", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true})
	if err != nil {
		t.Fatalf("chromium: attach to the page: %v", err)
	}
	var att struct {
		SessionID string `json:"sessionId"`
	}
	json.Unmarshal(res, &att)
	b.session = att.SessionID
	return b
}

// read delivers each answer to its caller; events are not needed.
func (b *browser) read(r io.ReadCloser) {
	defer r.Close()
	br := bufio.NewReaderSize(r, 1<<20)
	for {
		msg, err := br.ReadBytes(0)
		if err != nil {
			return
		}
		var m cdpMessage
		if json.Unmarshal(msg[:len(msg)-1], &m) != nil || m.ID == 0 {
			continue
		}
		b.mu.Lock()
		ch := b.waiting[m.ID]
		delete(b.waiting, m.ID)
		b.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
}

// call sends a command to the page's session.
func (b *browser) call(ctx context.Context, method string, params any) (json.RawMessage, error) {
	return b.callIn(ctx, b.session, method, params)
}

func (b *browser) callIn(ctx context.Context, session, method string, params any) (json.RawMessage, error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, errors.New("chromium: closed")
	}
	b.next++
	id := b.next
	ch := make(chan cdpMessage, 1)
	b.waiting[id] = ch
	b.mu.Unlock()
	req := map[string]any{"id": id, "method": method, "params": params}
	if session != "" {
		req["sessionId"] = session
	}
	msg, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := b.w.Write(append(msg, 0)); err != nil {
		return nil, fmt.Errorf("chromium: %s: %w", method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return nil, fmt.Errorf("chromium: %s: %s (%d)", method, m.Error.Message, m.Error.Code)
		}
		return m.Result, nil
	case <-b.exited:
		return nil, fmt.Errorf("chromium: %s: the browser exited (%v); see its log in %s", method, b.cmd.ProcessState, b.dir)
	case <-ctx.Done():
		return nil, fmt.Errorf("chromium: %s: %w", method, ctx.Err())
	}
}

// navigate loads url in the page; errText is the browser's reason when
// the load failed (a certificate error, say).
func (b *browser) navigate(ctx context.Context, url string) (errText string, err error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	res, err := b.call(ctx, "Page.navigate", map[string]any{"url": url})
	if err != nil {
		return "", err
	}
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	json.Unmarshal(res, &nav)
	return nav.ErrorText, nil
}

// eval runs a JavaScript expression in the page and returns its value.
func (b *browser) eval(ctx context.Context, expr string) json.RawMessage {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := b.call(ctx, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true})
	if err != nil {
		b.t.Fatalf("evaluate %s: %v", expr, err)
	}
	var ev struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text string `json:"text"`
		} `json:"exceptionDetails"`
	}
	json.Unmarshal(res, &ev)
	if ev.ExceptionDetails != nil {
		return nil // the page is between documents, or lacks what expr reads
	}
	return ev.Result.Value
}

func (b *browser) evalString(ctx context.Context, expr string) string {
	var s string
	json.Unmarshal(b.eval(ctx, expr), &s)
	return s
}

// text is what the page shows, as a person reads it.
func (b *browser) text(ctx context.Context) string {
	return b.evalString(ctx, `document.body ? document.body.innerText : ""`)
}

// waitJS waits until expr is true in the page; on timeout the test fails
// with a screenshot and the page's text.
func (b *browser) waitJS(ctx context.Context, what, url, expr string, timeout time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	for string(b.eval(ctx, expr)) != "true" {
		if time.Now().After(deadline) {
			b.fail(ctx, what, url, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitText waits until the page's text holds want and returns the text.
func (b *browser) waitText(ctx context.Context, what, url, want string, timeout time.Duration) string {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		text := b.text(ctx)
		if strings.Contains(text, want) {
			return text
		}
		if time.Now().After(deadline) {
			b.fail(ctx, what, url, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func (b *browser) fail(ctx context.Context, what, url string, timeout time.Duration) {
	b.t.Helper()
	shot := b.screenshot(ctx, "failed")
	b.t.Fatalf("timed out after %v waiting for %s at %s; the page (%s) shows:\n%.2000s\nscreenshot %s",
		timeout, what, url, b.evalString(ctx, "location.href"), b.text(ctx), shot)
}

// screenshot saves the page as a PNG among the test's artifacts.
func (b *browser) screenshot(ctx context.Context, name string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := b.call(ctx, "Page.captureScreenshot", map[string]any{"format": "png"})
	if err != nil {
		b.t.Errorf("screenshot %s: %v", name, err)
		return ""
	}
	var shot struct {
		Data string `json:"data"`
	}
	json.Unmarshal(res, &shot)
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	if err != nil {
		b.t.Errorf("screenshot %s: %v", name, err)
		return ""
	}
	p := filepath.Join(b.dir, b.name+"-"+name+".png")
	if err := os.WriteFile(p, png, 0o644); err != nil {
		b.t.Errorf("screenshot %s: %v", name, err)
	}
	return p
}

// close asks the browser to quit (its helpers go with it), and kills its
// process group if it does not within 10 s.
func (b *browser) close() {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	b.callIn(ctx, "", "Browser.close", nil)
	cancel()
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		// Not reaped yet, so the group's id is still chromium's.
		b.t.Logf("chromium (%s) did not quit within 10s of Browser.close: killed", b.name)
		syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
		<-b.exited
	}
	b.w.Close()
}
