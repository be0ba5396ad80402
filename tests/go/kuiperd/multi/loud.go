//go:build loud

package main

// The second version of the plugin: shout ends its answer with "!".
func init() {
	shoutEnding = "!"
}
