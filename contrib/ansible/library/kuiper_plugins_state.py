#!/usr/bin/python
"""Converge one kuiper-plugins node to a plugin set: Ansible's side of `PUT /config/plugins`.

The service does the work: it compares the document with what the node has, applies the difference one
plugin at a time, and undoes every change of the request when one step fails. This module only carries the
document there and reports the answer the way Ansible expects: `changed` is the service's own verdict, so a
second run of the same document is `ok` and downloads nothing; check mode asks for the plan (`?dryRun=1`,
which writes nothing); diff mode shows that plan, plugin by plugin. A refusal fails the task with the
service's message, the plugin that failed and what was rolled back, so a rollout with `serial` and
`max_fail_percentage: 0` stops at the first node that could not converge.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.urls import fetch_url

try:
    import yaml
except ImportError:  # a target without PyYAML can still read JSON documents
    yaml = None

DOCUMENTATION = r"""
module: kuiper_plugins_state
short_description: Converge a kuiper-plugins node to a declared plugin set
description:
  - Sends a plugin set to the kuiper-plugins service's C(PUT /config/plugins), which installs, updates,
    re-registers and (with O(prune)) removes plugins until the node has the plugins the document names.
  - The service applies the changes one plugin at a time; if one fails, every change of that request is rolled
    back and the task fails with the service's message.
  - Applying the same document again changes nothing and downloads nothing; the task is then C(ok).
options:
  url:
    description:
      - The service's base URL, e.g. V(http://127.0.0.1:9081); C(/config/plugins) is added.
    type: str
    required: true
  token:
    description:
      - A JWT, sent in the C(Authorization) header as C(Bearer <token>), for a service with authentication on.
      - Without it, a service with authentication off serves only its own user, root and its allowed users,
        over the loopback, so run the task on the node itself as one of them.
    type: str
  state:
    description:
      - The plugin set, in the document format of C(GET /config/plugins) (C(sources), C(sinks), C(functions),
        C(portables), each mapping a name to C(file), C(sha256), C(functions), C(shellParas)), or the plugin
        part of eKuiper's C(/data/export) (C(nativePlugins), C(portablePlugins)).
      - Either the document itself (a dict), or the path of a YAML or JSON file on the host the module runs on.
    type: raw
    required: true
  prune:
    description:
      - Also remove the plugins the document does not name. Without it they are kept, unless the document
        itself sets C(prune) to V(true).
    type: bool
    default: false
  validate_certs:
    description:
      - Verify the service's TLS certificate for an V(https) URL.
    type: bool
    default: true
  use_proxy:
    description:
      - Go through the proxy that C(http_proxy) or C(https_proxy) names. Set it to V(false) when those are set
        on the node and the service's address is not in C(no_proxy).
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the service's answer; it answers once every download and install is done.
    type: int
    default: 600
notes:
  - Check mode asks the service for the plan (C(?dryRun=1)); nothing is downloaded into place or written.
  - Diff mode shows each planned change as the plugin's recorded entry before and after.
"""

EXAMPLES = r"""
- name: Converge this node's plugins to plugins.yml (templated with the host's variables)
  kuiper_plugins_state:
    url: http://127.0.0.1:9081
    state: "{{ lookup('template', 'plugins.yml') | from_yaml }}"

- name: The same from a file already on the node, removing the plugins it does not name
  kuiper_plugins_state:
    url: https://edge-1.example:9081
    token: "{{ kuiper_plugins_token }}"
    state: /etc/kuiper-plugins/plugins.yml
    prune: true
"""

RETURN = r"""
changes:
  description: What was done (or, in check mode, would be done), in order, as the service answered it.
  returned: success
  type: list
  elements: dict
  sample:
    - action: update
      type: sink
      name: echo
      from: {version: "1.0.0", sha256: "9f2c...", file: "https://packages.example/echo1.zip"}
      to: {version: "2.0.0", sha256: "51ab...", file: "https://packages.example/echo2.zip"}
      reason: "file differs: installed from https://packages.example/echo1.zip"
dry_run:
  description: Whether this was the plan only (check mode).
  returned: success
  type: bool
status:
  description: The HTTP status of the service's answer.
  returned: always
  type: int
failed_plugin:
  description: The step that failed, as C(type), C(name) and C(action).
  returned: failure
  type: dict
rolled_back:
  description: The changes of this request that were undone after the failure.
  returned: failure
  type: list
  elements: dict
"""

DOCUMENT_PATH = "/config/plugins"


def load_state(module: AnsibleModule, state: Any) -> dict:
    """Return the plugin set: the given dict, or the YAML or JSON file a string names."""
    if isinstance(state, dict):
        return state
    if not isinstance(state, str):
        module.fail_json(msg="state must be a plugin set (a dict) or the path of a YAML or JSON file, "
                             f"not {type(state).__name__}")
    path = os.path.expanduser(state)
    try:
        with open(path, "rb") as stream:
            text = stream.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        module.fail_json(msg=f"cannot read the plugin set {path}: {exc}")
    try:
        document = json.loads(text)
    except ValueError:
        # Not JSON: YAML, which needs PyYAML where the module runs.
        if yaml is None:
            module.fail_json(msg=missing_required_lib("PyYAML", reason=f"to read the YAML plugin set {path}"))
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            module.fail_json(msg=f"the plugin set {path} is neither JSON nor YAML: {exc}")
    if not isinstance(document, dict):
        module.fail_json(msg=f"the plugin set {path} must hold a mapping, not {type(document).__name__}")
    return document


def entry_text(entry: dict | None) -> str:
    """Render a plugin's entry as sorted `key: value` lines, the text a diff compares."""
    if not entry:
        return ""
    # A plan knows a package's version and digest only when the document gives them: the rest is "unknown",
    # not null, which would read as "removed".
    return "".join(f"{key}: {'unknown' if entry[key] is None else json.dumps(entry[key], sort_keys=True)}\n"
                   for key in sorted(entry))


def plan_diff(changes: list[dict]) -> list[dict]:
    """Turn the service's changes into Ansible diffs: each plugin's entry before and after."""
    diffs = []
    for change in changes:
        plugin = f"{change.get('type')} {change.get('name')}"
        action = f"{change.get('action')}" + (f", {change['reason']}" if change.get("reason") else "")
        diffs.append({
            "before_header": plugin,
            "after_header": f"{plugin} ({action})",
            "before": entry_text(change.get("from")),
            "after": entry_text(change.get("to")),
        })
    return diffs


def answer_json(module: AnsibleModule, raw: bytes | str | None, status: int) -> Any:
    """Parse the service's JSON answer; fail the task saying what came instead."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
    try:
        return json.loads(text)
    except ValueError:
        module.fail_json(msg=f"the service answered {status} without JSON: {text[:500]!r}", status=status)


def refusal_message(body: Any, fallback: str) -> str:
    """The service's message in a refusal: `message` in its usual envelope, `error` in a plugin set's."""
    if isinstance(body, dict):
        for key in ("message", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
    return fallback


def main() -> None:
    """Send the plugin set to the node and report the service's answer."""
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "token": {"type": "str", "no_log": True},
            "state": {"type": "raw", "required": True},
            "prune": {"type": "bool", "default": False},
            "validate_certs": {"type": "bool", "default": True},
            "use_proxy": {"type": "bool", "default": True},  # read by fetch_url, as validate_certs is
            "timeout": {"type": "int", "default": 600},
        },
        supports_check_mode=True,
    )
    document = dict(load_state(module, module.params["state"]))
    if module.params["prune"]:
        document["prune"] = True

    url = module.params["url"].rstrip("/") + DOCUMENT_PATH + ("?dryRun=1" if module.check_mode else "")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if module.params["token"]:
        headers["Authorization"] = f"Bearer {module.params['token']}"
    response, info = fetch_url(module, url, data=json.dumps(document), headers=headers, method="PUT",
                               timeout=module.params["timeout"])
    status = info["status"]

    if status == -1 or (response is None and status < 400):
        module.fail_json(msg=f"cannot reach the service at {module.params['url']}: {info.get('msg')}",
                         status=status)
    if status >= 400:
        body = answer_json(module, info.get("body"), status) if info.get("body") else None
        message = refusal_message(body, f"the service answered {status}: {info.get('msg')}")
        if status == 404 and not (isinstance(body, dict) and body.get("failed")):
            # No step failed: the route itself is missing, so the URL is not a service that takes plugin sets.
            message += (f" (no {DOCUMENT_PATH} at {module.params['url']}: "
                        "is it a kuiper-plugins service that takes plugin sets?)")
        module.fail_json(
            msg=message,
            status=status,
            failed_plugin=body.get("failed") if isinstance(body, dict) else None,
            rolled_back=body.get("rolledBack", []) if isinstance(body, dict) else [],
            changed=False,
        )

    answer = answer_json(module, response.read(), status)
    if not isinstance(answer, dict) or not isinstance(answer.get("changed"), bool):
        module.fail_json(msg=f"the service's answer has no 'changed' verdict: {str(answer)[:500]}", status=status)
    changes = answer.get("changes") or []
    result = {"changed": answer["changed"], "changes": changes, "dry_run": bool(answer.get("dryRun")),
              "status": status}
    if module._diff and changes:
        result["diff"] = plan_diff(changes)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
