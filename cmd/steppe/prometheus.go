package main

import (
	"context"
	"fmt"
	"os"

	"github.com/steppe/steppe/internal/deploy"
)

// runPrometheus prints (or writes to -out) the Prometheus scrape
// configuration of the cluster's Consul and Nomad agents.
func runPrometheus(ctx context.Context, args []string) error {
	fs, o := clusterFlags("prometheus")
	out := fs.String("out", "", "write the configuration to this file instead of standard output")
	if _, err := parseNoArgs(fs, args); err != nil {
		return err
	}
	o.Out = nil
	cfg, err := deploy.Prometheus(ctx, *o)
	if err != nil {
		return err
	}
	if *out != "" {
		return deploy.WritePrometheus(*out, cfg)
	}
	if _, err := os.Stdout.Write(cfg); err != nil {
		return fmt.Errorf("write configuration: %w", err)
	}
	return nil
}
