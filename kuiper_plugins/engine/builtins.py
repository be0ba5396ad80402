"""The names eKuiper 2.x builds in: a plugin of such a name could never be used.

eKuiper looks a source, sink or function up among its built-ins first, so a
plugin named `mqtt` or a function named `abs` would install and then be
ignored by every rule. The lists are those of eKuiper's default build
(`internal/binder/io/builtin.go` and the redis extension of a non-core build,
and the `builtins` table of `internal/binder/function`), as of eKuiper 2.4.
Names are compared case-insensitively: a native plugin's .so file name
upper-cases the first letter, and our names are unique regardless of case.
A portable plugin's sources and functions are checked as well (at install
and when a folder is adopted at start-up); its sinks are not: eKuiper's own
sample portable plugin declares a sink named `file`. Optional extensions of
the "full" build (kafka, sql, video, image, influx, influx2) and edgex are
left out: eKuiper ships them as plugins too.
"""

from __future__ import annotations

SOURCES = frozenset({
    "mqtt", "httppull", "httppush", "file", "memory", "neuron", "websocket", "simulator", "nexmark",
    "redisSub", "redis",
})
SINKS = frozenset({
    "log", "logToMemory", "mqtt", "rest", "nop", "memory", "neuron", "file", "websocket", "sse", "redis",
    "redisPub",
})
FUNCTIONS = frozenset("""
abs acc_avg acc_count acc_max acc_min acc_sum acos array_cardinality array_concat array_contains
array_contains_any array_create array_distinct array_except array_flatten array_intersect array_join
array_last_position array_map array_max array_min array_position array_remove array_shuffle array_sort
array_union asin atan atan2 avg bitand bitnot bitor bitxor bypass cardinality cast ceil ceiling changed_col
changed_cols chr coalesce collect concat conv convert_tz cos cosh cot count crc32 cur_date cur_time
current_date current_time current_timestamp date_calc date_diff day day_name day_of_month day_of_week
day_of_year dec2hex decode deduplicate degrees delay element_at encode endswith erase event_time exp extract
floor format format_time from_days from_unix_time get_keyed_state had_changed hex2dec hour inc_avg
inc_collect inc_count inc_last_value inc_max inc_merge_agg inc_min inc_sum indexof isnull items
json_path_exists json_path_query json_path_query_first keys kvpair_array_to_obj lag last_agg_hit_count
last_agg_hit_time last_day last_hit_count last_hit_time last_value latest length ln local_time
local_timestamp log lower lpad ltrim max md5 median merge_agg meta microsecond min minute mod month
month_name mqtt newuuid now numbytes obj_to_kvpair_array object object_concat object_construct object_pick
object_size parse_json percentile_cont percentile_disc pi pow power props radians rand regexp_matches
regexp_replace regexp_substr repeat reverse round row_number rpad rtrim rule_id rule_start second sequence
sha1 sha256 sha384 sha512 sign sin sinh split_value sqrt startswith stddev stddevs substring sum tan tanh
to_json to_seconds trim trunc tstamp unnest upper values var vars window_end window_start window_trigger zip
""".split())

BY_KIND = {"sources": SOURCES, "sinks": SINKS, "functions": FUNCTIONS}
_FOLDED = {kind: {n.lower(): n for n in names} for kind, names in BY_KIND.items()}
_WORD = {"sources": "source", "sinks": "sink", "functions": "function"}


def builtin_name(kind: str, name: str) -> str | None:
    """eKuiper's spelling of the built-in `kind` ("sources", "sinks", "functions") that `name` names, or None."""
    return _FOLDED[kind].get(name.lower())


def describe(kind: str, name: str) -> str:
    """Why a built-in name is refused, for a message."""
    return f"{name} is a built-in {_WORD[kind]} of eKuiper, which always uses its own"
