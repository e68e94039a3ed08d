# An example machine agent: a web server, and a service that starts only
# once the web server answers. Run it with:
#   go run ./cmd/steppe agent -config examples/agent.hcl
service "web" {
  command = "/usr/bin/python3"
  args    = ["-m", "http.server", "18080", "--bind", "127.0.0.1"]
  ready {
    http = "http://127.0.0.1:18080/"
  }
}

service "after-web" {
  command = "/bin/sleep"
  args    = ["100000"]
  after   = ["web"]
}
