package main

import (
	"context"
	"fmt"
)

func runAgent(ctx context.Context, args []string) error {
	return fmt.Errorf("steppe agent: not built yet")
}
