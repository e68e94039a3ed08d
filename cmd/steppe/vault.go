package main

import (
	"context"
	"fmt"
	"time"

	"github.com/steppe/steppe/internal/deploy"
)

// runVault is `steppe vault unseal`.
func runVault(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] != "unseal" {
		return fmt.Errorf("%w: steppe vault unseal [-state DIR] [-spec FILE]", errUsage)
	}
	fs, opts := clusterFlags("vault unseal")
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for each Vault to answer and unseal")
	if _, err := parseNoArgs(fs, args[1:]); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	return deploy.VaultUnseal(ctx, *opts)
}
