package hashi

// The helpers the external tests (package hashi_test, which can import
// hashitest) share with the package.
var (
	Poll       = poll
	Permanent  = permanent
	StatusCode = statusCode
)
