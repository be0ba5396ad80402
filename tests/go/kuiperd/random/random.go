// Command random is a native source plugin for the benchmark against the engine: Random@v1.0.0.so.
//
// eKuiper looks a source up under its name with the first letter upper-cased and accepts a function
// returning an api.Source. Each pull ingests one tuple {"value": n}, n a pseudo-random integer below
// the configured `max` (100 when unset). The benchmark only installs, lists and describes it, as a
// user would with any source, so that the engine and the service hold the same plugins.
package main

import (
	"math/rand/v2"
	"time"

	"github.com/lf-edge/ekuiper/contract/v2/api"
)

type random struct {
	max int64
}

func (r *random) Provision(_ api.StreamContext, configs map[string]any) error {
	r.max = 100
	switch m := configs["max"].(type) {
	case int:
		r.max = int64(m)
	case int64:
		r.max = m
	case float64:
		r.max = int64(m)
	}
	if r.max <= 0 {
		r.max = 100
	}
	return nil
}

func (*random) Connect(_ api.StreamContext, status api.StatusChangeHandler) error {
	status(api.ConnectionConnected, "")
	return nil
}

func (r *random) Pull(ctx api.StreamContext, trigger time.Time, ingest api.TupleIngest, _ api.ErrorIngest) {
	ingest(ctx, map[string]any{"value": rand.Int64N(r.max)}, nil, trigger)
}

func (*random) Close(api.StreamContext) error {
	return nil
}

// Random is the exported symbol the engine looks up: a new source for each stream that uses it.
func Random() api.Source {
	return &random{}
}

var _ api.PullTupleSource = &random{}
