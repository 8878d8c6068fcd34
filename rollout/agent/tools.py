"""The agent's tools: their JSON schemas (shown to the model in the Qwen2.5 function-calling format) and
the two that act on the repository, bash and the file editor, implemented over the Environment protocol.

submit and ask_expert only carry arguments here: the agent loop acts on them (it owns the expert and
the trajectory's end). Any problem with a call (unknown tool, missing or mistyped argument, an edit
that cannot apply) raises ToolError, whose message becomes the observation."""
from __future__ import annotations

import shlex

from protege.rollout.envs.base import Environment

BASH, EDITOR, SUBMIT, ASK_EXPERT = "bash", "str_replace_editor", "submit", "ask_expert"
EDITOR_COMMANDS = ("view", "create", "str_replace", "insert")


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


TOOLS = [
    _function(BASH, "Run a bash command in the repository's root directory and see its output. "
              "Commands run non-interactively with a time limit.",
              {"command": {"type": "string", "description": "The bash command to run."}}, ["command"]),
    _function(EDITOR, "View, create and edit files. view: a file with line numbers, or a directory's "
              "entries two levels deep. create: a new file (fails if it exists). str_replace: replace "
              "old_str, which must occur exactly once in the file, with new_str. insert: insert "
              "insert_text after line insert_line (0 inserts at the top).",
              {"command": {"type": "string", "enum": list(EDITOR_COMMANDS), "description": "The operation."},
               "path": {"type": "string", "description": "File or directory, absolute or relative to the "
                                                         "repository root."},
               "view_range": {"type": "array", "items": {"type": "integer"},
                              "description": "view: [first, last] line numbers, 1-based; last -1 = to the end."},
               "file_text": {"type": "string", "description": "create: the file's content."},
               "old_str": {"type": "string", "description": "str_replace: the exact text to replace."},
               "new_str": {"type": "string", "description": "str_replace: the replacement (default empty)."},
               "insert_line": {"type": "integer", "description": "insert: the line after which to insert."},
               "insert_text": {"type": "string", "description": "insert: the text to insert."}},
              ["command", "path"]),
    _function(SUBMIT, "Submit the current state of the repository as your fix and end the task.", {}, []),
    _function(ASK_EXPERT, "Ask a senior software engineer for guidance when you are stuck. Calls are limited: "
              "explain what you tried and ask a specific question.",
              {"question": {"type": "string", "description": "Your question, with what you tried."}},
              ["question"]),
]
_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
_EDITOR_REQUIRED = {"view": (), "create": ("file_text",), "str_replace": ("old_str",),
                    "insert": ("insert_line", "insert_text")}
_JSON_TYPES = {"string": str, "integer": int, "array": list, "object": dict}


class ToolError(Exception):
    """A tool call that cannot run; its message is shown to the model as the observation."""


def validate_call(name: str, arguments) -> None:
    """Check a call against the tool's schema: known tool, object arguments, required present, types right."""
    if name not in _SCHEMAS:
        raise ToolError(f"Unknown tool {name!r}. Available tools: {', '.join(_SCHEMAS)}.")
    if not isinstance(arguments, dict):
        raise ToolError(f"The arguments of {name} must be a JSON object, got {type(arguments).__name__}.")
    schema = _SCHEMAS[name]
    required = list(schema["required"])
    if name == EDITOR and arguments.get("command") in _EDITOR_REQUIRED:
        required += _EDITOR_REQUIRED[arguments["command"]]
    missing = [key for key in required if key not in arguments]
    if missing:
        raise ToolError(f"{name}: missing required argument(s): {', '.join(missing)}.")
    for key, value in arguments.items():
        spec = schema["properties"].get(key)
        if spec is None:
            raise ToolError(f"{name}: unknown argument {key!r}.")
        expected = _JSON_TYPES[spec["type"]]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ToolError(f"{name}: argument {key!r} must be of type {spec['type']}, got {value!r:.80}.")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"{name}: argument {key!r} must be one of {spec['enum']}, got {value!r:.80}.")
    for key in ("command", "path"):  # they become process arguments, which cannot hold a NUL
        if isinstance(arguments.get(key), str) and "\0" in arguments[key]:
            raise ToolError(f"{name}: argument {key!r} contains a NUL character, which no command or path can hold.")


def truncate(text: str, limit: int) -> str:
    """Keep the head and the tail of an over-long observation, with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n<... {len(text) - limit} characters omitted ...>\n{text[len(text) - tail:]}"


def run_bash(env: Environment, command: str, timeout: float) -> tuple[str, int]:
    """Run a command; the observation is its output plus a note on a non-zero exit or a timeout."""
    result = env.run(command, timeout=timeout)
    text = result.output if result.output.strip() else "(no output)"
    if result.timed_out:
        text += f"\n[the command timed out after {timeout:g} s and was killed]"
    elif result.exit_code != 0:
        text += f"\n[exit code {result.exit_code}]"
    return text, result.exit_code


def _lines(text: str) -> list[str]:
    """A file's lines as `cat -n` counts them (a final newline ends the last line, it starts no new one)."""
    return text.removesuffix("\n").split("\n") if text else []


def _numbered(lines: list[str], first: int) -> str:
    return "\n".join(f"{first + i:6}\t{line}" for i, line in enumerate(lines))


def _read(env: Environment, path: str) -> str:
    try:
        return env.read_file(path)
    except FileNotFoundError:
        raise ToolError(f"The path {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:   # a directory, a binary file, a path outside the repository
        raise ToolError(f"Cannot read {path} as a text file: {e}") from None


def _write(env: Environment, path: str, content: str) -> None:
    try:
        env.write_file(path, content)
    except OSError as e:
        raise ToolError(f"Cannot write {path}: {e}") from None


def _is_dir(env: Environment, path: str) -> bool:
    return env.run(f"test -d {shlex.quote(path)}").exit_code == 0


def _snippet(text: str, first_line: int, last_line: int, context: int = 4) -> str:
    lines = _lines(text)
    start = max(1, first_line - context)
    return _numbered(lines[start - 1:last_line + context], start)


def run_editor(env: Environment, arguments: dict) -> str:
    """One file-editor operation (arguments already validated); returns the observation."""
    command, path = arguments["command"], arguments["path"]
    if command == "view":
        if _is_dir(env, path):
            listing = env.run(f"find {shlex.quote(path)} -maxdepth 2 -not -path '*/.*' | sort")
            return f"Files and directories up to 2 levels deep in {path}:\n{listing.output}"
        lines = _lines(_read(env, path))
        first, last = 1, len(lines)
        if "view_range" in arguments:
            view_range = arguments["view_range"]
            if len(view_range) != 2 or not all(isinstance(n, int) for n in view_range):
                raise ToolError(f"view_range must be two integers [first, last], got {view_range}.")
            first, last = view_range[0], (len(lines) if view_range[1] == -1 else view_range[1])
            if not 1 <= first <= last <= len(lines):
                raise ToolError(f"Invalid view_range {view_range}: {path} has {len(lines)} lines.")
        return f"Here is {path} (lines {first}-{last}):\n{_numbered(lines[first - 1:last], first)}"
    if _is_dir(env, path):
        raise ToolError(f"{path} is a directory; {command} needs a file.")
    if command == "create":
        if env.run(f"test -e {shlex.quote(path)}").exit_code == 0:
            raise ToolError(f"{path} already exists; use str_replace or insert to change it.")
        _write(env, path, arguments["file_text"])
        return f"File created: {path}"
    text = _read(env, path)
    if command == "str_replace":
        old, new = arguments["old_str"], arguments.get("new_str", "")
        count = text.count(old) if old else 0
        if count != 1:
            raise ToolError(f"old_str must occur exactly once in {path}; it occurs {count} times."
                            + (" Include more surrounding lines to make it unique." if count > 1 else ""))
        at = text.index(old)
        edited = text[:at] + new + text[at + len(old):]
        _write(env, path, edited)
        first = text[:at].count("\n") + 1
        last = first + new.count("\n")
        return f"The file {path} has been edited. The changed region:\n{_snippet(edited, first, last)}"
    line, insert = arguments["insert_line"], arguments["insert_text"]
    lines = _lines(text)
    if not 0 <= line <= len(lines):
        raise ToolError(f"insert_line {line} is out of range: {path} has {len(lines)} lines "
                        f"(use 0..{len(lines)}).")
    new_lines = _lines(insert) or [""]
    ending = "\n" if text.endswith("\n") or not text else ""
    edited = "\n".join(lines[:line] + new_lines + lines[line:]) + ending
    _write(env, path, edited)
    return f"The file {path} has been edited. The changed region:\n{_snippet(edited, line + 1, line + len(new_lines))}"
