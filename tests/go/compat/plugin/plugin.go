// Package main is a native plugin in eKuiper's way: a main package built with -buildmode=plugin
// that exports a symbol and links the shared module example.com/dep.
package main

import "example.com/dep"

// Greeting is the exported symbol a host would look up.
func Greeting() string { return dep.Greeting() }
