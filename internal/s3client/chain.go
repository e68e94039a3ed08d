package s3client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
)

// chain is the standard AWS chain's answer for one client, in its order
// of precedence:
//
//	region       Options.Region, AWS_REGION, AWS_DEFAULT_REGION, the
//	             profile's region in the config file, else us-east-1
//	endpoint     Options.Endpoint, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL,
//	             the profile's endpoint_url, else AWS's own
//	credentials  AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with
//	             AWS_SESSION_TOKEN), the profile in the shared
//	             credentials file (AWS_SHARED_CREDENTIALS_FILE, else
//	             ~/.aws/credentials), the profile's keys in the config
//	             file (AWS_CONFIG_FILE, else ~/.aws/config), the EC2
//	             instance role (only with AWS_EC2_METADATA_DISABLED=false)
//
// The profile is Options.Profile, AWS_PROFILE, else "default". Files are
// read when a request first needs credentials, so that rotated keys are
// picked up when the cached ones expire (never, for static keys).
type chain struct {
	region, endpoint string
	profile          string
	credFile, conf   string
	conf0            map[string]string // the profile's section of the config file
	imds             aws.CredentialsProvider
}

func loadChain(o Options) (*chain, error) {
	home, _ := os.UserHomeDir()
	c := &chain{
		profile:  first(o.Profile, os.Getenv("AWS_PROFILE"), "default"),
		credFile: first(os.Getenv("AWS_SHARED_CREDENTIALS_FILE"), filepath.Join(home, ".aws", "credentials")),
		conf:     first(os.Getenv("AWS_CONFIG_FILE"), filepath.Join(home, ".aws", "config")),
	}
	section := "profile " + c.profile
	if c.profile == "default" {
		section = "default"
	}
	var err error
	if c.conf0, err = readSection(c.conf, section); err != nil {
		return nil, err
	}
	c.region = first(o.Region, os.Getenv("AWS_REGION"), os.Getenv("AWS_DEFAULT_REGION"), c.conf0["region"], "us-east-1")
	c.endpoint = first(o.Endpoint, os.Getenv("AWS_ENDPOINT_URL_S3"), os.Getenv("AWS_ENDPOINT_URL"), c.conf0["endpoint_url"])
	if os.Getenv("AWS_EC2_METADATA_DISABLED") == "false" {
		c.imds = ec2rolecreds.New()
	}
	return c, nil
}

// Retrieve implements aws.CredentialsProvider.
func (c *chain) Retrieve(ctx context.Context) (aws.Credentials, error) {
	if id, secret := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"); id != "" && secret != "" {
		return aws.Credentials{AccessKeyID: id, SecretAccessKey: secret, SessionToken: os.Getenv("AWS_SESSION_TOKEN"), Source: "environment"}, nil
	}
	creds, err := readSection(c.credFile, c.profile)
	if err != nil {
		return aws.Credentials{}, err
	}
	for _, sec := range []struct {
		m    map[string]string
		from string
	}{{creds, c.credFile}, {c.conf0, c.conf}} {
		if id, secret := sec.m["aws_access_key_id"], sec.m["aws_secret_access_key"]; id != "" && secret != "" {
			return aws.Credentials{AccessKeyID: id, SecretAccessKey: secret, SessionToken: sec.m["aws_session_token"], Source: sec.from}, nil
		}
	}
	if c.imds != nil {
		return c.imds.Retrieve(ctx)
	}
	return aws.Credentials{}, fmt.Errorf("%w: no AWS credentials: none in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, nor for profile %q in %s or %s (the EC2 instance role is asked only with AWS_EC2_METADATA_DISABLED=false)",
		ErrDenied, c.profile, c.credFile, c.conf)
}

// readSection returns the keys of [section] in an INI file of the AWS
// shared files; a missing file has none.
func readSection(path, section string) (map[string]string, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("AWS shared file: %w", err)
	}
	defer f.Close()
	m := map[string]string{}
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if line[0] == '[' && strings.HasSuffix(line, "]") {
			in = strings.TrimSpace(line[1:len(line)-1]) == section
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && in {
			m[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("AWS shared file %s: %w", path, err)
	}
	return m, nil
}

func first(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}
