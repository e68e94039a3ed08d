package bundle

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ServerOptions tune a Server.
type ServerOptions struct {
	// PollInterval is how often the latest file of a cluster/role is
	// looked at (stat) while clients wait on it and its directory cannot
	// be watched through inotify (it does not exist yet, or inotify is
	// unavailable); zero means 100ms. One stat per (cluster, role) being
	// waited on, per interval, whatever the number of waiting clients.
	PollInterval time.Duration
	// MaxWait caps a client's ?wait=; zero means 5 minutes.
	MaxWait time.Duration
	// Keys, when set, enable PUT: a bundle signed by one of them, for the
	// cluster and role of the URL and newer than the published one, is
	// published. Without keys the server is read-only.
	Keys []PublicKey
	// Logger receives one line per publish and per error; nil means
	// slog.Default().
	Logger *slog.Logger
}

// Server serves a DirStore over HTTP with ETags and long polls (see
// HTTPStore for the protocol). Publishes into the directory by any process
// are noticed through inotify at once, or by stat within PollInterval.
type Server struct {
	store *DirStore
	opt   ServerOptions
	log   *slog.Logger

	mu      sync.Mutex
	watches map[string]*watch // by cluster/role, only while someone waits
	polling bool
	kick    chan struct{} // a new cluster/role is waited on: watch it now
}

// watch is the change signal for one cluster/role: ch is closed (and
// replaced) when the latest file changes.
type watch struct {
	path    string
	ch      chan struct{}
	waiters int
	id      fileID
	exists  bool
	// snap is the latest file's content as of id, read once per change,
	// so that the waiters a publish wakes (10,000 of them) are answered
	// from memory: no open file each (which, beside a connection each,
	// would pass 20,000 descriptors), no stat, no hash.
	snap *snapshot
}

// snapshot is the content of a latest file and its ETag.
type snapshot struct {
	etag string
	data []byte
}

// maxSnapshotBytes bounds the latest file kept in memory per watched
// cluster/role; a larger one is served from the file by each waiter.
const maxSnapshotBytes = 16 << 20

// NewServer serves the bundles in dir.
func NewServer(dir string, opt ServerOptions) *Server {
	if opt.PollInterval <= 0 {
		opt.PollInterval = 100 * time.Millisecond
	}
	if opt.MaxWait <= 0 {
		opt.MaxWait = 5 * time.Minute
	}
	log := opt.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Server{store: &DirStore{Dir: dir}, opt: opt, log: log, watches: make(map[string]*watch), kick: make(chan struct{}, 1)}
}

// Handler returns the HTTP handler: /v1/bundles/{cluster}/{role}.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/bundles/{cluster}/{role}", s.get)
	mux.HandleFunc("HEAD /v1/bundles/{cluster}/{role}", s.get)
	mux.HandleFunc("PUT /v1/bundles/{cluster}/{role}", s.put)
	return mux
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	cluster, role := r.PathValue("cluster"), r.PathValue("role")
	latest, err := s.store.latestPath(cluster, role)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var wait time.Duration
	if q := r.URL.Query().Get("wait"); q != "" {
		if wait, err = time.ParseDuration(q); err != nil || wait < 0 {
			http.Error(w, fmt.Sprintf("wait=%q: want a duration such as 30s", q), http.StatusBadRequest)
			return
		}
		wait = min(wait, s.opt.MaxWait)
	}
	inm := r.Header.Get("If-None-Match")
	deadline := time.Now().Add(wait)
	key := cluster + "/" + role

	var ch <-chan struct{}
	for {
		f, etag, err := s.store.open(cluster, role)
		switch {
		case err == nil && !etagMatch(inm, etag):
			defer f.Close()
			s.serveFile(w, r, f, etag)
			return
		case err == nil:
			f.Close()
		case !errors.Is(err, ErrNotFound):
			s.log.Error("bundle server: open", "bundle", key, "err", err)
			http.Error(w, "cannot read the bundle", http.StatusInternalServerError)
			return
		}
		left := time.Until(deadline)
		if left <= 0 {
			if err != nil {
				http.Error(w, fmt.Sprintf("no bundle published for %s", key), http.StatusNotFound)
				return
			}
			w.Header().Set("ETag", etag)
			w.WriteHeader(http.StatusNotModified)
			return
		}
		if ch == nil {
			// Subscribe, then look again (the loop) before sleeping, so a
			// publish between the first look and the subscription is seen.
			var done func()
			ch, done = s.subscribe(key, latest)
			defer done()
			continue
		}
		t := time.NewTimer(left)
		select {
		case <-r.Context().Done():
			t.Stop()
			return
		case <-t.C:
		case <-ch:
			t.Stop()
			var snap *snapshot
			ch, snap = s.current(key)
			if snap != nil && !etagMatch(inm, snap.etag) {
				s.serveSnapshot(w, r, snap)
				return
			}
		}
	}
}

// etagMatch reports whether an If-None-Match header names etag: "*", or
// a comma-separated list compared weakly (RFC 9110, 13.1.2).
func etagMatch(inm, etag string) bool {
	for _, t := range strings.Split(inm, ",") {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		if t == "*" || (t != "" && t == strings.TrimPrefix(etag, "W/")) {
			return true
		}
	}
	return false
}

func (s *Server) serveFile(w http.ResponseWriter, r *http.Request, f *os.File, etag string) {
	fi, err := f.Stat()
	if err != nil {
		http.Error(w, "cannot read the bundle", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("ETag", etag)
	h.Set("Content-Type", "application/gzip")
	h.Set("Content-Length", strconv.FormatInt(fi.Size(), 10))
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	if _, err := io.Copy(w, f); err != nil {
		s.log.Debug("bundle server: send", "path", r.URL.Path, "err", err)
	}
}

func (s *Server) put(w http.ResponseWriter, r *http.Request) {
	if len(s.opt.Keys) == 0 {
		http.Error(w, "this server trusts no keys, so it accepts no publishes (start it with -key)", http.StatusMethodNotAllowed)
		return
	}
	cluster, role := r.PathValue("cluster"), r.PathValue("role")
	if _, err := s.store.latestPath(cluster, role); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	body := http.MaxBytesReader(w, r.Body, DefaultMaxTotalBytes+maxManifestBytes)
	m, err := s.store.Publish(r.Context(), body, PublishOptions{Keys: s.opt.Keys, Cluster: cluster, Role: role})
	if err != nil {
		s.log.Warn("bundle server: publish refused", "bundle", cluster+"/"+role, "err", err)
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	s.log.Info("bundle server: published", "bundle", cluster+"/"+role, "version", m.Version)
	s.notify(cluster + "/" + role)
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, "published %s/%s version %d\n", cluster, role, m.Version)
}

// Waiting returns the number of requests waiting in long polls.
func (s *Server) Waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, wt := range s.watches {
		n += wt.waiters
	}
	return n
}

// subscribe registers a waiter for key and returns the channel closed at
// the next change, and a function to call when done waiting.
func (s *Server) subscribe(key, path string) (<-chan struct{}, func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	wt := s.watches[key]
	if wt == nil {
		wt = &watch{path: path, ch: make(chan struct{})}
		wt.id, wt.exists = stat(path)
		s.watches[key] = wt
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
	wt.waiters++
	if !s.polling {
		s.polling = true
		go s.poll()
	}
	return wt.ch, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if wt.waiters--; wt.waiters == 0 {
			delete(s.watches, key)
		}
	}
}

// current returns the present change channel of key and the content
// that the last change brought (nil when it is not in memory).
func (s *Server) current(key string) (<-chan struct{}, *snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if wt := s.watches[key]; wt != nil {
		return wt.ch, wt.snap
	}
	// Unreachable while the caller holds a subscription; a closed channel
	// makes the caller look again rather than sleep forever.
	ch := make(chan struct{})
	close(ch)
	return ch, nil
}

func (s *Server) serveSnapshot(w http.ResponseWriter, r *http.Request, snap *snapshot) {
	h := w.Header()
	h.Set("ETag", snap.etag)
	h.Set("Content-Type", "application/gzip")
	h.Set("Content-Length", strconv.Itoa(len(snap.data)))
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	if _, err := w.Write(snap.data); err != nil {
		s.log.Debug("bundle server: send", "path", r.URL.Path, "err", err)
	}
}

// load reads path's content and identity together (one open file), for
// a snapshot; a file too large or unreadable gives none.
func load(path string) (fileID, bool, *snapshot) {
	f, err := os.Open(path)
	if err != nil {
		id, exists := stat(path)
		return id, exists, nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		id, exists := stat(path)
		return id, exists, nil
	}
	id := statID(fi)
	if fi.Size() > maxSnapshotBytes {
		return id, true, nil
	}
	data, err := io.ReadAll(io.LimitReader(f, maxSnapshotBytes+1))
	if err != nil || int64(len(data)) != fi.Size() {
		return id, true, nil
	}
	return id, true, &snapshot{etag: contentETag(data), data: data}
}

func (s *Server) notify(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if wt := s.watches[key]; wt != nil {
		wt.id, wt.exists, wt.snap = load(wt.path)
		close(wt.ch)
		wt.ch = make(chan struct{})
	}
}

// backstopInterval is how often a cluster/role watched through inotify is
// also looked at by stat, in case an event was lost.
const backstopInterval = time.Second

// poll runs while anyone waits. Each cluster/role whose directory exists
// is watched through inotify, so a publish wakes its waiters at once; the
// others (and, every backstopInterval, all) are looked at by stat every
// PollInterval.
func (s *Server) poll() {
	w := newDirWatcher()
	defer w.close()
	var events <-chan string
	if w != nil {
		events = w.events
	}
	t := time.NewTimer(s.opt.PollInterval)
	defer t.Stop()
	lastFull := time.Now()
	for {
		select {
		case key := <-events:
			s.check(key)
			continue
		case <-s.kick:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
		case <-t.C:
		}
		s.mu.Lock()
		if len(s.watches) == 0 {
			s.polling = false
			s.mu.Unlock()
			return
		}
		keys := make(map[string]string, len(s.watches))
		for k, wt := range s.watches {
			keys[k] = wt.path
		}
		s.mu.Unlock()

		full := time.Since(lastFull) >= backstopInterval
		if full {
			lastFull = time.Now()
		}
		unwatched := false
		if w != nil {
			w.prune(keys)
		}
		for key, path := range keys {
			watched := w != nil && w.watching(key)
			if !watched && w != nil && w.add(key, filepath.Dir(path)) {
				watched = true
				full = true // look once now: a change may predate the watch
			}
			if !watched {
				unwatched = true
			}
			if !watched || full {
				s.check(key)
			}
		}
		next := s.opt.PollInterval
		if !unwatched {
			next = max(next, backstopInterval)
		}
		t.Reset(next)
	}
}

// check looks at key's latest file and wakes its waiters if it changed.
func (s *Server) check(key string) {
	s.mu.Lock()
	wt := s.watches[key]
	s.mu.Unlock()
	if wt == nil {
		return
	}
	id, exists := stat(wt.path)
	s.mu.Lock()
	changed := id != wt.id || exists != wt.exists
	s.mu.Unlock()
	if !changed {
		return
	}
	id, exists, snap := load(wt.path) // outside the lock: it reads the file
	s.mu.Lock()
	defer s.mu.Unlock()
	if id != wt.id || exists != wt.exists {
		wt.id, wt.exists, wt.snap = id, exists, snap
		close(wt.ch)
		wt.ch = make(chan struct{})
	}
}

// dirWatcher turns inotify events on the directories of watched
// cluster/roles into their keys.
type dirWatcher struct {
	fd     int
	f      *os.File // owns fd; reads go through the runtime poller
	events chan string

	mu     sync.Mutex
	closed bool
	byWD   map[int32]string
	byKey  map[string]int32
}

// newDirWatcher returns nil where inotify is not available; callers then
// rely on stat alone.
func newDirWatcher() *dirWatcher {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil
	}
	w := &dirWatcher{
		fd: fd, f: os.NewFile(uintptr(fd), "inotify"),
		events: make(chan string, 256),
		byWD:   make(map[int32]string), byKey: make(map[string]int32),
	}
	go w.read()
	return w
}

const watchMask = unix.IN_MOVED_TO | unix.IN_CREATE | unix.IN_CLOSE_WRITE | unix.IN_DELETE | unix.IN_ATTRIB |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

func (w *dirWatcher) add(key, dir string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return false
	}
	wd, err := unix.InotifyAddWatch(w.fd, dir, watchMask)
	if err != nil {
		return false // not there yet: stat until it is
	}
	w.byWD[int32(wd)] = key
	w.byKey[key] = int32(wd)
	return true
}

func (w *dirWatcher) watching(key string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, ok := w.byKey[key]
	return ok
}

// prune stops watching keys nobody waits for any more.
func (w *dirWatcher) prune(keep map[string]string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for key, wd := range w.byKey {
		if _, ok := keep[key]; !ok {
			unix.InotifyRmWatch(w.fd, uint32(wd))
			delete(w.byKey, key)
			delete(w.byWD, wd)
		}
	}
}

func (w *dirWatcher) read() {
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return // closed
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			off += unix.SizeofInotifyEvent + int(ev.Len)
			w.mu.Lock()
			key, ok := w.byWD[ev.Wd]
			if ev.Mask&unix.IN_IGNORED != 0 && ok {
				// The directory went away; stat takes over until it is back.
				delete(w.byWD, ev.Wd)
				delete(w.byKey, key)
			}
			w.mu.Unlock()
			if !ok {
				continue
			}
			select {
			case w.events <- key:
			default: // full: the backstop stat finds the change
			}
		}
	}
}

func (w *dirWatcher) close() {
	if w == nil {
		return
	}
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.f.Close()
}

func stat(path string) (fileID, bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, false
	}
	return statID(fi), true
}
