// Package gohive stands in for sqlflow.org/gohive, which the Go module proxy refuses to serve.
// eKuiper's go.mod lists it for an optional SQL driver that the default kuiperd build does not compile.
package gohive
