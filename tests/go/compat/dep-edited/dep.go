// Package dep is the module both host and plugin link, as eKuiper's contract module is.
package dep

// Greeting says hello, in other words: same version, other content.
func Greeting() string { return "hello, edited" }
