// Command multi is a native function plugin for the live-engine tests: one .so exporting two functions.
//
// eKuiper looks a function up in the plugin that registered it under the function's name with its first
// letter upper-cased, and accepts a value implementing api.Function. So `twice` is the symbol Twice and
// `shout` is Shout; installing the plugin with "functions": ["twice", "shout"] tells the engine both
// names belong to Multi@v1.0.0.so. Built with the tag `loud` (loud.go), shout ends its answer with "!":
// a second version of the same plugin whose output differs, for the update tests.
package main

import (
	"fmt"
	"strings"

	"github.com/lf-edge/ekuiper/contract/v2/api"
)

// twice doubles a number, keeping integers integral.
type twice struct{}

func (*twice) Validate(args []any) error {
	if len(args) != 1 {
		return fmt.Errorf("twice takes exactly one argument, got %d", len(args))
	}
	return nil
}

func (*twice) Exec(_ api.FunctionContext, args []any) (any, bool) {
	switch x := args[0].(type) {
	case int:
		return int64(x) * 2, true
	case int32:
		return int64(x) * 2, true
	case int64:
		return x * 2, true
	case uint64:
		return x * 2, true
	case float32:
		return float64(x) * 2, true
	case float64:
		return x * 2, true
	default:
		return fmt.Errorf("twice needs a number, got %T", args[0]), false
	}
}

func (*twice) IsAggregate() bool {
	return false
}

// shout upper-cases a string.
type shout struct{}

func (*shout) Validate(args []any) error {
	if len(args) != 1 {
		return fmt.Errorf("shout takes exactly one argument, got %d", len(args))
	}
	return nil
}

func (*shout) Exec(_ api.FunctionContext, args []any) (any, bool) {
	text, ok := args[0].(string)
	if !ok {
		return fmt.Errorf("shout needs a string, got %T", args[0]), false
	}
	return strings.ToUpper(text) + shoutEnding, true
}

// shoutEnding is what shout puts after its answer: nothing, or "!" in the build tagged loud.
var shoutEnding = ""

func (*shout) IsAggregate() bool {
	return false
}

// The exported symbols the engine looks up; pointers to them implement api.Function.
var (
	Twice twice
	Shout shout
)

var (
	_ api.Function = &Twice
	_ api.Function = &Shout
)
