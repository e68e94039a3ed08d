package artifact

import (
	"net/http"
	"strings"
)

// StoreHandler serves a store directory over HTTP: files only, no
// directory listings of anything but the store's own layout, and no
// dot-files (temporary files of a publish in progress).
func StoreHandler(dir string) http.Handler {
	fs := http.FileServer(http.Dir(dir))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, part := range strings.Split(r.URL.Path, "/") {
			if strings.HasPrefix(part, ".") {
				http.NotFound(w, r)
				return
			}
		}
		fs.ServeHTTP(w, r)
	})
}
