package s3client

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// The chain's precedence, on real files: the environment's keys first,
// then the profile in the credentials file, then in the config file;
// region and endpoint from options, environment, then the profile.
func TestChain(t *testing.T) {
	dir := t.TempDir()
	creds := filepath.Join(dir, "credentials")
	conf := filepath.Join(dir, "config")
	os.WriteFile(creds, []byte("# comment\n[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n\n[ops]\naws_access_key_id=OPSKEY\naws_secret_access_key=opssecret\naws_session_token = tok\n"), 0o600)
	os.WriteFile(conf, []byte("[default]\nregion = eu-west-3\n[profile cfg]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:9\naws_access_key_id = CFGKEY\naws_secret_access_key = cfgsecret\n"), 0o600)
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
		"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", creds)
	t.Setenv("AWS_CONFIG_FILE", conf)
	ctx := context.Background()
	get := func(o Options) (*chain, string, error) {
		t.Helper()
		c, err := loadChain(o)
		if err != nil {
			t.Fatal(err)
		}
		cr, err := c.Retrieve(ctx)
		return c, cr.AccessKeyID, err
	}
	if c, id, err := get(Options{}); err != nil || id != "FILEKEY" || c.region != "eu-west-3" || c.endpoint != "" {
		t.Fatalf("default profile: %s %s %q %v", id, c.region, c.endpoint, err)
	}
	if c, id, err := get(Options{Profile: "ops", Region: "us-west-2"}); err != nil || id != "OPSKEY" || c.region != "us-west-2" {
		t.Fatalf("profile ops: %s %s %v", id, c.region, err)
	}
	t.Setenv("AWS_PROFILE", "cfg")
	if c, id, err := get(Options{}); err != nil || id != "CFGKEY" || c.region != "ap-south-1" || c.endpoint != "http://127.0.0.1:9" {
		t.Fatalf("profile cfg from the config file: %s %s %q %v", id, c.region, c.endpoint, err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
	t.Setenv("AWS_REGION", "sa-east-1")
	t.Setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
	if c, id, err := get(Options{}); err != nil || id != "ENVKEY" || c.region != "sa-east-1" || c.endpoint != "http://127.0.0.1:10" {
		t.Fatalf("environment: %s %s %q %v", id, c.region, c.endpoint, err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_PROFILE", "nobody")
	if _, _, err := get(Options{}); !errors.Is(err, ErrDenied) {
		t.Fatalf("no credentials anywhere: want ErrDenied, got %v", err)
	}
	if c, _ := loadChain(Options{}); c.imds != nil {
		t.Fatal("the EC2 metadata service is asked without AWS_EC2_METADATA_DISABLED=false")
	}
}

func TestParse(t *testing.T) {
	loc, o, err := Parse("s3://b/p/q/?endpoint=http%3A%2F%2F127.0.0.1%3A8333&region=r1&interval=3s", Options{})
	if err != nil || loc.Bucket != "b" || loc.Prefix != "p/q" || o.Endpoint != "http://127.0.0.1:8333" || o.Region != "r1" || o.Interval.Seconds() != 3 {
		t.Fatalf("%+v %+v %v", loc, o, err)
	}
	for _, bad := range []string{"s3:///p", "http://b/p", "s3://b?x=1", "s3://b?endpoint=ftp://h", "s3://b?interval=-1s"} {
		if _, _, err := Parse(bad, Options{}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
