// Command mixed is a native function plugin for the live-engine tests: one function the engine can call and
// one it cannot.
//
// `good` (symbol Good) implements api.Function. `stale` (symbol Stale) is written against the contract
// before v2: its Exec takes the arguments first and the context second, as upstream's geohash extension
// still does. The .so opens and links like any other, so a link-hash check passes it; only the engine's
// type assertion on the symbol, made when a rule is validated, finds that it is not an api.Function.
package main

import (
	"fmt"

	"github.com/lf-edge/ekuiper/contract/v2/api"
)

// good returns its one argument unchanged.
type good struct{}

func (*good) Validate(args []any) error {
	if len(args) != 1 {
		return fmt.Errorf("good takes exactly one argument, got %d", len(args))
	}
	return nil
}

func (*good) Exec(_ api.FunctionContext, args []any) (any, bool) {
	return args[0], true
}

func (*good) IsAggregate() bool {
	return false
}

// stale has the old method order of Exec: it does not implement api.Function.
type stale struct{}

func (*stale) Validate(args []any) error {
	return nil
}

func (*stale) Exec(args []any, _ api.FunctionContext) (any, bool) {
	return args[0], true
}

func (*stale) IsAggregate() bool {
	return false
}

// The exported symbols the engine looks up.
var (
	Good  good
	Stale stale
)

var _ api.Function = &Good
