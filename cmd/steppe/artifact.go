package main

import (
	"context"
	"fmt"
)

func runArtifact(ctx context.Context, args []string) error {
	return fmt.Errorf("steppe artifact: not built yet")
}
