package main

import (
	"context"
	"fmt"
)

func runBundle(ctx context.Context, args []string) error {
	return fmt.Errorf("steppe bundle: not built yet")
}
