// Package dep is the module both host and plugin link, as eKuiper's contract module is.
package dep

// Greeting says hello.
func Greeting() string { return "hello" }
