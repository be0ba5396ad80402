// Package gomaxcompute stands in for sqlflow.org/gomaxcompute, which the Go module proxy refuses to serve.
// eKuiper's go.mod lists it for an optional SQL driver that the default kuiperd build does not compile.
package gomaxcompute
