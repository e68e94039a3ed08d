package artifact

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// A module zip from the proxy leaves out nested modules, so a product whose
// go.mod says `replace example.com/x/api => ./api` arrives without ./api.
// Each such directive is resolved, in order of preference, to:
//
//  1. the sub-module at the tagged commit (pseudo-version
//     v0.0.0-<commit time>-<12 hex of the commit>, from the root version's
//     .info), placed at the replaced directory: what the release built;
//  2. a version pinned for this product version (see product.pins), where
//     the required one is known not to compile;
//  3. the version the root go.mod requires, by dropping the replace: a
//     different (often older) sub-module than the release used;
//  4. dropping the replace when nothing requires the module.

// How a replace directive was resolved.
const (
	ResolvedPresent  = "present"  // the directory is in the module zip
	ResolvedCommit   = "commit"   // sub-module at the tagged commit, placed at the directory
	ResolvedPinned   = "pinned"   // replace dropped; a version pinned by steppe is required
	ResolvedRequired = "required" // replace dropped; the required version is used
	ResolvedDropped  = "dropped"  // replace dropped; nothing requires the module
)

// Resolution says how one `replace MODULE => ./DIR` directive was resolved.
type Resolution struct {
	Module  string `json:"module"`
	Dir     string `json:"dir"`
	How     string `json:"how"`
	Version string `json:"version,omitempty"` // the version used, if any
	// Tried is the pseudo-version of the tagged commit when it was tried and
	// could not be had.
	Tried string `json:"tried,omitempty"`
	// Warning is set when the build differs from the release's sources.
	Warning string `json:"warning,omitempty"`
}

func (r Resolution) String() string {
	var s string
	switch r.How {
	case ResolvedPresent:
		s = fmt.Sprintf("%s => %s: present in the module source", r.Module, r.Dir)
	case ResolvedCommit:
		s = fmt.Sprintf("%s => %s: %s@%s (the tagged commit)", r.Module, r.Dir, r.Module, r.Version)
	case ResolvedPinned:
		s = fmt.Sprintf("%s => %s: replace dropped, using %s@%s (pinned by steppe: the required version does not compile)", r.Module, r.Dir, r.Module, r.Version)
	case ResolvedRequired:
		s = fmt.Sprintf("%s => %s: replace dropped, using %s@%s (required by go.mod)", r.Module, r.Dir, r.Module, r.Version)
	case ResolvedDropped:
		s = fmt.Sprintf("%s => %s: replace dropped (not required)", r.Module, r.Dir)
	default:
		s = fmt.Sprintf("%s => %s: %s", r.Module, r.Dir, r.How)
	}
	if r.Tried != "" {
		s += fmt.Sprintf("; %s@%s is not obtainable", r.Module, r.Tried)
	}
	return s
}

// localReplace is one `replace OLD[@V] => ./DIR` directive whose directory
// is missing from the source.
type localReplace struct {
	module   string
	oldVer   string // "" unless the directive names a version
	dir      string
	required string // the version go.mod requires, "" if none
}

// missingLocalReplaces lists the replace directives that point at a local
// directory absent from the source tree; present ones are reported as
// such in present.
func missingLocalReplaces(m goMod, srcDir string) (missing []localReplace, present []Resolution) {
	req := map[string]string{}
	for _, r := range m.Require {
		req[r.Path] = r.Version
	}
	for _, r := range m.Replace {
		if r.New.Version != "" || !isLocalPath(r.New.Path) {
			continue
		}
		if fileExists(filepath.Join(srcDir, r.New.Path, "go.mod")) {
			present = append(present, Resolution{Module: r.Old.Path, Dir: r.New.Path, How: ResolvedPresent})
			continue
		}
		missing = append(missing, localReplace{module: r.Old.Path, oldVer: r.Old.Version, dir: r.New.Path, required: req[r.Old.Path]})
	}
	return missing, present
}

func isLocalPath(p string) bool {
	return p == "." || p == ".." || strings.HasPrefix(p, "./") || strings.HasPrefix(p, "../")
}

// commitPseudoVersion is the pseudo-version the module proxy serves a
// module at the given commit under, when no earlier tag of that module
// applies; "" if the origin is unknown.
func commitPseudoVersion(o *origin) string {
	if o == nil || len(o.Hash) < 12 || o.Time.IsZero() {
		return ""
	}
	return "v0.0.0-" + o.Time.UTC().Format("20060102150405") + "-" + o.Hash[:12]
}

// moduleDownloader fetches a module version into the module cache.
type moduleDownloader interface {
	download(ctx context.Context, path, version string, log io.Writer) (moduleInfo, error)
}

// resolveReplaces decides every missing local replace of the source tree
// at srcDir and applies the decision: it copies sub-modules into place and
// returns the go.mod edits (flags for `go mod edit`) that drop the others.
func resolveReplaces(ctx context.Context, dl moduleDownloader, m goMod, root *origin, pins map[string]string, srcDir string, log io.Writer) (res []Resolution, edits []string, err error) {
	missing, present := missingLocalReplaces(m, srcDir)
	res = append(res, present...)
	pseudo := commitPseudoVersion(root)
	for _, lr := range missing {
		r := Resolution{Module: lr.module, Dir: lr.dir}
		if pseudo != "" {
			mi, err := dl.download(ctx, lr.module, pseudo, log)
			switch {
			case err == nil:
				dst := filepath.Join(srcDir, filepath.FromSlash(lr.dir))
				if err := copyTree(mi.Dir, dst); err != nil {
					return nil, nil, fmt.Errorf("place %s@%s at %s: %w", lr.module, pseudo, lr.dir, err)
				}
				r.How, r.Version = ResolvedCommit, pseudo
				res = append(res, r)
				continue
			case errors.Is(err, errUnavailable):
				r.Tried = pseudo
			default:
				return nil, nil, fmt.Errorf("resolve replace %s => %s: %w", lr.module, lr.dir, err)
			}
		}
		target := lr.module
		if lr.oldVer != "" {
			target += "@" + lr.oldVer
		}
		edits = append(edits, "-dropreplace="+target)
		if pin := pins[lr.module]; pin != "" {
			edits = append(edits, "-require="+lr.module+"@"+pin)
			r.How, r.Version = ResolvedPinned, pin
		} else if lr.required == "" {
			r.How = ResolvedDropped
		} else {
			r.How, r.Version = ResolvedRequired, lr.required
		}
		res = append(res, r)
	}
	return res, edits, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
