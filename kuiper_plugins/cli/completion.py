"""Shell completion for bash and zsh: shtab reads the argument parser, these functions add what it cannot know.

shtab (imported only by `kuiper-plugins completion`) writes the script from
the parser itself: commands, options, choices. The parser marks the
arguments whose values live on the server (`action.complete`, one of the
dicts below): a plugin's name after its type, a function plugin's name, a
function's, an upload's. Their shell functions run `kuiper-plugins` itself,
with the `--url` and `--token` given on the line being completed, its errors
dropped, for 5 s at most, so that a TAB never hangs on a service that does
not answer, and never prints into the line. The program run is the one named
on the line (`.venv/bin/kuiper-plugins`, or after `sudo`), else the one on
$PATH.

Load it with `source <(kuiper-plugins completion bash)` (in ~/.bashrc), or
save `kuiper-plugins completion zsh` as `_kuiper-plugins` in a folder of
zsh's `$fpath`.
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")
PLUGIN_TYPE_WORDS = "source sink function portable"
ANY_TYPE_WORD = "source|sources|sink|sinks|function|functions|portable|portables"

TYPES = {"bash": "_kuiper_plugins_types", "zsh": f"({PLUGIN_TYPE_WORDS})"}
NATIVE_TYPES = {"bash": "_kuiper_plugins_native_types", "zsh": "(source sink function)"}
PLUGIN_NAMES = {"bash": "_kuiper_plugins_plugin_names", "zsh": "_kuiper_plugins_zsh_plugin_names"}
FUNCTION_PLUGINS = {"bash": "_kuiper_plugins_function_plugins", "zsh": "_kuiper_plugins_zsh_function_plugins"}
FUNCTION_NAMES = {"bash": "_kuiper_plugins_function_names", "zsh": "_kuiper_plugins_zsh_function_names"}
UPLOAD_NAMES = {"bash": "_kuiper_plugins_upload_names", "zsh": "_kuiper_plugins_zsh_upload_names"}

BASH = rf"""
# Run kuiper-plugins as typed on this line (after `sudo` or the like, too), with the line's --url and
# --token, quietly, 5 s at most.
_kuiper_plugins_ask() {{
  local -a words given=()
  local i program=kuiper-plugins
  read -ra words <<< "${{COMP_LINE:0:COMP_POINT}}"
  for ((i = 0; i < ${{#words[@]}}; i++)); do
    [[ ${{words[i]##*/}} == kuiper-plugins ]] && program=${{words[i]}} && given=() && continue
    case ${{words[i]}} in
      --url|--token) given+=("${{words[i]}}" "${{words[i+1]}}"); i=$((i + 1)) ;;
      --url=*|--token=*) given+=("${{words[i]}}") ;;
    esac
  done
  timeout 5 "$program" "${{given[@]}}" "$@" </dev/null 2>/dev/null
}}

_kuiper_plugins_types() {{
  compgen -W "{PLUGIN_TYPE_WORDS}" -- "$1"
}}

_kuiper_plugins_native_types() {{
  compgen -W "source sink function" -- "$1"
}}

# The names of the installed plugins of the type given before the word being completed.
_kuiper_plugins_plugin_names() {{
  local line="${{COMP_LINE:0:COMP_POINT}}" word type=
  local -a words
  read -ra words <<< "$line"
  [[ $line == *[[:space:]] ]] || unset 'words[${{#words[@]}}-1]'
  for word in "${{words[@]:1}}"; do
    case $word in {ANY_TYPE_WORD}) type=$word ;; esac
  done
  [[ -n $type ]] && compgen -W "$(_kuiper_plugins_ask list -o name "$type")" -- "$1"
}}

_kuiper_plugins_function_plugins() {{
  compgen -W "$(_kuiper_plugins_ask list -o name function)" -- "$1"
}}

_kuiper_plugins_function_names() {{
  compgen -W "$(_kuiper_plugins_ask udfs -o name)" -- "$1"
}}

_kuiper_plugins_upload_names() {{
  compgen -W "$(_kuiper_plugins_ask uploads -o name)" -- "$1"
}}
"""

ZSH = rf"""
# Run kuiper-plugins as typed on this line (after `sudo` or the like, too), with the line's --url and
# --token, quietly, 5 s at most.
_kuiper_plugins_zsh_ask() {{
  local -a line_words given
  local i program=kuiper-plugins
  line_words=(${{(z)LBUFFER}})
  for (( i = 1; i <= $#line_words; i++ )); do
    if [[ ${{${{(Q)line_words[i]}}:t}} == kuiper-plugins ]]; then
      program=${{(Q)line_words[i]}}; given=(); continue
    fi
    case $line_words[i] in
      (--url|--token) given+=($line_words[i] ${{(Q)line_words[i+1]}}); (( i++ )) ;;
      (--url=*|--token=*) given+=(${{(Q)line_words[i]}}) ;;
    esac
  done
  timeout 5 $program $given "$@" </dev/null 2>/dev/null
}}

# The names of the installed plugins of the type given before the word being completed.
_kuiper_plugins_zsh_plugin_names() {{
  local -a line_words names
  local word type
  line_words=(${{(z)LBUFFER}})
  [[ $LBUFFER == *[[:space:]] ]] || line_words[-1]=()
  for word in $line_words[2,-1]; do
    case $word in ({ANY_TYPE_WORD}) type=$word ;; esac
  done
  [[ -n $type ]] || return 1
  names=(${{(f)"$(_kuiper_plugins_zsh_ask list -o name $type)"}})
  compadd -a names
}}

_kuiper_plugins_zsh_function_plugins() {{
  local -a names
  names=(${{(f)"$(_kuiper_plugins_zsh_ask list -o name function)"}})
  compadd -a names
}}

_kuiper_plugins_zsh_function_names() {{
  local -a names
  names=(${{(f)"$(_kuiper_plugins_zsh_ask udfs -o name)"}})
  compadd -a names
}}

_kuiper_plugins_zsh_upload_names() {{
  local -a names
  names=(${{(f)"$(_kuiper_plugins_zsh_ask uploads -o name)"}})
  compadd -a names
}}
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell`, written by shtab from `parser`."""
    import shtab

    return shtab.complete(parser, shell=shell, preamble={"bash": BASH, "zsh": ZSH}[shell])
