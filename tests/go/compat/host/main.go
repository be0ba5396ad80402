// Command host stands in for eKuiper's engine: it links example.com/dep, opens the plugin named by
// its argument with plugin.Open and prints "ok", or the error as eKuiper's native manager wraps it.
package main

import (
	"fmt"
	"os"
	"plugin"

	"example.com/dep"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: host PLUGIN.so")
		os.Exit(64)
	}
	path := os.Args[1]
	_ = dep.Greeting()
	if _, err := plugin.Open(path); err != nil {
		fmt.Printf("cannot open %s: %v\n", path, err)
		return
	}
	fmt.Println("ok")
}
