"""The local proxy's repairs of Chat Completions traffic (PROTOCOL: The local proxy).

Mostly pure functions, so no server: request bodies shaped like the ones OpenCode,
Hermes and a Gemini model through OpenCode send, table-driven; a property test
that any history comes out valid; and the SSE filter fed whole, byte by byte
and in random chunkings, which must all give the same expected events. At the
end, hostile input (schemas that explode, paths that leave the routes) through a
real server and a fake upstream that records what arrives.
"""

import copy
import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import coda as repairs  # noqa: E402

BLANK = repairs.EMPTY_ASSISTANT_CONTENT
NO_OUTPUT = repairs.EMPTY_TOOL_RESULT
LEADING = repairs.LEADING_USER_TURN


# ---------------------------------------------------------------------------
# Message builders, in the shapes the agents send
# ---------------------------------------------------------------------------

def system(text):
    return {"role": "system", "content": text}


def user(content):
    return {"role": "user", "content": content}


def text(value):
    return {"type": "text", "text": value}


def assistant(content, *calls, **extra):
    message = {"role": "assistant", "content": content, **extra}
    if calls:
        message["tool_calls"] = list(calls)
    return message


def call(call_id, name="bash", **arguments):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments or {"command": "ls"})}}


def result(call_id, content="ok"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# OpenCode 1.18 (@ai-sdk/openai-compatible): two system messages, user text as
# parts, "" beside tool calls, zod schemas with $schema/additionalProperties.
OPENCODE_TOOLS = [
    {"type": "function", "function": {
        "name": "bash", "description": "Executes a given bash command in a persistent shell session.",
        "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                       "properties": {"command": {"type": "string", "description": "The command to execute"},
                                      "timeout": {"type": "number", "description": "Optional timeout in ms"},
                                      "description": {"type": "string", "description": "What it does, in 5-10 words"}},
                       "required": ["command", "description"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "todowrite", "description": "Use this tool to create and manage a structured task list.",
        "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                       "properties": {"todos": {"type": "array", "description": "The updated todo list",
                                                "items": {"type": "object", "additionalProperties": False,
                                                          "properties": {"content": {"type": "string"},
                                                                         "status": {"type": "string",
                                                                                    "enum": ["pending", "completed"]},
                                                                         "id": {"type": "string"}},
                                                          "required": ["content", "status", "id"]}}},
                       "required": ["todos"], "additionalProperties": False}}},
]
OPENCODE_TOOLS_CLEAN = [
    {"type": "function", "function": {
        "name": "bash", "description": "Executes a given bash command in a persistent shell session.",
        "parameters": {"type": "object",
                       "properties": {"command": {"type": "string", "description": "The command to execute"},
                                      "timeout": {"type": "number", "description": "Optional timeout in ms"},
                                      "description": {"type": "string", "description": "What it does, in 5-10 words"}},
                       "required": ["command", "description"]}}},
    {"type": "function", "function": {
        "name": "todowrite", "description": "Use this tool to create and manage a structured task list.",
        "parameters": {"type": "object",
                       "properties": {"todos": {"type": "array", "description": "The updated todo list",
                                                "items": {"type": "object",
                                                          "properties": {"content": {"type": "string"},
                                                                         "status": {"type": "string",
                                                                                    "enum": ["pending", "completed"]},
                                                                         "id": {"type": "string"}},
                                                          "required": ["content", "status", "id"]}}},
                       "required": ["todos"]}}},
]
OPENCODE_BODY = {
    "model": "databricks-claude-opus-4-6",
    "max_tokens": 32000,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": OPENCODE_TOOLS,
    "tool_choice": "auto",
    "messages": [
        system("You are opencode, an interactive CLI tool that helps users with software engineering tasks."),
        system("Here is some useful information about the environment you are running in: <env>...</env>"),
        user([text("list the files here, then tidy the README")]),
        assistant("", call("toolu_bdrk_01", command="ls -la", description="Lists files")),
        result("toolu_bdrk_01", "total 16\n-rw-r--r-- 1 app app 1204 README.md\n-rw-r--r-- 1 app app 88 main.py\n"),
        assistant([text("")]),  # an empty turn left by a model switch
        user([text("  "), text("go on")]),
    ],
}
OPENCODE_REPAIRED = {
    "model": "databricks-claude-opus-4-6",
    "max_tokens": 32000,
    "temperature": 0,
    "stream": True,
    "tools": OPENCODE_TOOLS_CLEAN,
    "tool_choice": "auto",
    "messages": [
        system("You are opencode, an interactive CLI tool that helps users with software engineering tasks."),
        system("Here is some useful information about the environment you are running in: <env>...</env>"),
        user([text("list the files here, then tidy the README")]),
        assistant(BLANK, call("toolu_bdrk_01", command="ls -la", description="Lists files")),
        result("toolu_bdrk_01", "total 16\n-rw-r--r-- 1 app app 1204 README.md\n-rw-r--r-- 1 app app 88 main.py\n"),
        user([text("go on")]),
    ],
}

# Hermes Agent 0.19 (OpenAI Python SDK): content None beside tool calls, the
# `terminal` tool's JSON-ish results, an interrupted turn left without results.
HERMES_TOOLS = [
    {"type": "function", "function": {
        "name": "terminal", "description": "Run a shell command in the user's terminal.",
        "parameters": {"type": "object",
                       "properties": {"command": {"type": "string"}, "background": {"type": "boolean"},
                                      "timeout": {"type": "integer", "minimum": 1}},
                       "required": ["command"]}}},
]
HERMES_BODY = {
    "model": "databricks-claude-opus-4-6",
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": HERMES_TOOLS,
    "messages": [
        system("You are Hermes, an agent created by Nous Research."),
        user("what is in my projects folder?"),
        assistant(None, call("call_a1", "terminal", command="ls ~/projects")),
        user("stop, run pwd instead"),  # the user interrupted: call_a1 never got a result
        assistant(None, call("call_a2", "terminal", command="pwd")),
        result("call_a2", '{"output": "/home/app/projects", "exit_code": 0, "error": null}'),
        result("call_a1", '{"output": "", "exit_code": 130, "error": "interrupted"}'),  # too late: orphaned
    ],
}
HERMES_REPAIRED = {
    "model": "databricks-claude-opus-4-6",
    "stream": True,
    "tools": HERMES_TOOLS,
    "messages": [
        system("You are Hermes, an agent created by Nous Research."),
        user("what is in my projects folder?\n\nstop, run pwd instead"),
        assistant(BLANK, call("call_a2", "terminal", command="pwd")),
        result("call_a2", '{"output": "/home/app/projects", "exit_code": 0, "error": null}'),
    ],
}

# A Gemini model through OpenCode, with an MCP tool whose schema pydantic made:
# $defs and $ref, a title, and properties that happen to be called like keywords.
GEMINI_TOOLS = [
    {"type": "function", "function": {
        "name": "query_table", "description": "Query a Unity Catalog table.",
        "parameters": {
            "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:query_table",
            "$comment": "generated by pydantic", "title": "QueryArgs", "type": "object",
            "$defs": {"Filter": {"type": "object", "additionalProperties": False,
                                 "properties": {"column": {"type": "string"},
                                                "op": {"enum": ["=", "<", ">"]},
                                                "value": {"anyOf": [{"type": "string"}, {"type": "number"}]}},
                                 "required": ["column", "op"]}},
            "properties": {
                "table": {"type": "string", "description": "catalog.schema.table"},
                "filters": {"type": "array", "items": {"$ref": "#/$defs/Filter"}},
                "$id": {"type": "string", "description": "a column literally named $id"},
                "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["table"], "additionalProperties": False}}},
]
GEMINI_TOOLS_CLEAN = [
    {"type": "function", "function": {
        "name": "query_table", "description": "Query a Unity Catalog table.",
        "parameters": {
            "title": "QueryArgs", "type": "object",
            "properties": {
                "table": {"type": "string", "description": "catalog.schema.table"},
                "filters": {"type": "array", "items": {"type": "object",
                                                       "properties": {"column": {"type": "string"},
                                                                      "op": {"enum": ["=", "<", ">"]},
                                                                      "value": {"anyOf": [{"type": "string"},
                                                                                          {"type": "number"}]}},
                                                       "required": ["column", "op"]}},
                "$id": {"type": "string", "description": "a column literally named $id"},
                "additionalProperties": {"type": "object"},
            },
            "required": ["table"]}}},
]
GEMINI_BODY = {
    "model": "databricks-gemini-2-5-pro",
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": GEMINI_TOOLS,
    "messages": [
        system("You are opencode, an interactive CLI tool."),
        user([text("how many orders shipped late?")]),
        assistant("Let me query the orders table.",
                  call("call_g1", "query_table", table="main.sales.orders",
                       filters=[{"column": "late", "op": "=", "value": "true"}])),
        result("call_g1", ""),  # the tool printed nothing
        system("The user switched to plan mode."),  # OpenCode's mid-conversation note
        user([text("and by region?")]),
    ],
}
GEMINI_REPAIRED = {
    "model": "databricks-gemini-2-5-pro",
    "stream": True,
    "tools": GEMINI_TOOLS_CLEAN,
    "messages": [
        system("You are opencode, an interactive CLI tool."),
        user([text("how many orders shipped late?")]),
        assistant("Let me query the orders table.",
                  call("call_g1", "query_table", table="main.sales.orders",
                       filters=[{"column": "late", "op": "=", "value": "true"}])),
        result("call_g1", NO_OUTPUT),
        user([text("The user switched to plan mode."), text("and by region?")]),
    ],
}

AGENT_BODIES = [("opencode", OPENCODE_BODY, OPENCODE_REPAIRED), ("hermes", HERMES_BODY, HERMES_REPAIRED),
                ("gemini", GEMINI_BODY, GEMINI_REPAIRED)]


@pytest.mark.parametrize("name,body,expected", AGENT_BODIES, ids=[b[0] for b in AGENT_BODIES])
def test_agent_bodies_are_repaired_without_touching_the_input(name, body, expected):
    before = copy.deepcopy(body)
    repaired = repairs.repair_chat_request(body)
    assert repaired == expected
    assert body == before, "the input was mutated"
    assert repairs.repair_chat_request(repaired) == repaired, "a second repair changed something"


# ---------------------------------------------------------------------------
# Every message repair, one row each: (name, messages in, messages out)
# ---------------------------------------------------------------------------

HI = user("hi")
MESSAGE_CASES = [
    ("a valid history is left alone",
     [system("s"), HI, assistant(BLANK, call("c1")), result("c1"), assistant("done")],
     [system("s"), HI, assistant(BLANK, call("c1")), result("c1"), assistant("done")]),
    ("an empty user string goes and its neighbours merge",
     [HI, assistant("hello"), user(""), user("run the tests")],
     [HI, assistant("hello"), user("run the tests")]),
    ("a whitespace-only user string goes",
     [HI, assistant("hello"), user(" \n\t "), user("go")],
     [HI, assistant("hello"), user("go")]),
    ("blank text parts go, the rest stays",
     [user([text(""), text("read README.md"), text("\n\n")])],
     [user([text("read README.md")])]),
    ("an image stays when its text parts are blank",
     [user([text(" "), {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}])],
     [user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}])]),
    ("a text part without text goes",
     [user([{"type": "text"}, text("x")])],
     [user([text("x")])]),
    ("tool calls beside \"\" get Databricks' single space",
     [HI, assistant("", call("c1")), result("c1")],
     [HI, assistant(BLANK, call("c1")), result("c1")]),
    ("tool calls beside null get it too",
     [HI, assistant(None, call("c1")), result("c1")],
     [HI, assistant(BLANK, call("c1")), result("c1")]),
    ("tool calls with no content key get it too",
     [HI, {"role": "assistant", "tool_calls": [call("c1")]}, result("c1")],
     [HI, {"role": "assistant", "tool_calls": [call("c1")], "content": BLANK}, result("c1")]),
    ("tool calls beside blank text parts get it too",
     [HI, assistant([text(""), text("  ")], call("c1")), result("c1")],
     [HI, assistant(BLANK, call("c1")), result("c1")]),
    ("an assistant turn with nothing to say goes and the users merge",
     [user("a"), assistant(""), user("b")],
     [user("a\n\nb")]),
    ("an empty tool_calls list goes",
     [HI, assistant("done", tool_calls=[])],
     [HI, assistant("done")]),
    ("a result for a call nobody made goes",
     [HI, assistant("", call("c1")), result("c1"), result("c9")],
     [HI, assistant(BLANK, call("c1")), result("c1")]),
    ("a result after a user message goes, then its unanswered call, then the empty turn",
     [HI, assistant("", call("c1")), user("stop"), result("c1")],
     [user("hi\n\nstop")]),
    ("a result after a turn that called nothing goes",
     [HI, assistant("sure"), result("c1")],
     [HI, assistant("sure")]),
    ("a call without a result goes, its answered sibling stays",
     [HI, assistant("Two things.", call("c1"), call("c2")), result("c1")],
     [HI, assistant("Two things.", call("c1")), result("c1")]),
    ("a second result for the same call goes",
     [HI, assistant("", call("c1")), result("c1", "first"), result("c1", "second")],
     [HI, assistant(BLANK, call("c1")), result("c1", "first")]),
    ("results in another order than their calls stay",
     [HI, assistant("", call("c1"), call("c2")), result("c2"), result("c1")],
     [HI, assistant(BLANK, call("c1"), call("c2")), result("c2"), result("c1")]),
    ("an empty result stays, saying so",
     [HI, assistant("", call("c1")), result("c1", "  ")],
     [HI, assistant(BLANK, call("c1")), result("c1", NO_OUTPUT)]),
    ("a tool result given as blank parts stays, saying so",
     [HI, assistant("", call("c1")), result("c1", [text("")])],
     [HI, assistant(BLANK, call("c1")), result("c1", NO_OUTPUT)]),
    ("a later system message becomes a user message and merges",
     [system("s"), user("a"), assistant("b"), system("note"), user("c")],
     [system("s"), user("a"), assistant("b"), user("note\n\nc")]),
    ("several system messages at the start stay",
     [system("s1"), system("s2"), HI],
     [system("s1"), system("s2"), HI]),
    ("a history opening with assistant turns gets a user turn in front, keeping them",
     [system("s"), assistant("Summary of the work so far.", call("c0")), result("c0"), assistant("ok"), user("a")],
     [system("s"), user(LEADING), assistant("Summary of the work so far.", call("c0")), result("c0"),
      assistant("ok"), user("a")]),
    ("an orphan result first goes, then the history still opens with a user turn",
     [result("c0"), assistant("hello"), user("a")],
     [user(LEADING), assistant("hello"), user("a")]),
    ("an opening turn that goes entirely leaves no user turn in front",
     [system("s"), assistant("", call("c0")), user("a")],
     [system("s"), user("a")]),
    ("with no user message at all, none is invented",
     [system("s"), assistant("hello")],
     [system("s"), assistant("hello")]),
    ("two assistant turns merge: text, then calls",
     [HI, assistant("Let me look."), assistant("", call("c1")), result("c1")],
     [HI, assistant("Let me look.", call("c1")), result("c1")]),
    ("a string and parts merge into parts",
     [user("a"), user([text("b")])],
     [user([text("a"), text("b")])]),
    ("an interrupted call's turn goes and the next turn stays",
     [system("s"), HI, assistant(None, call("c1")), assistant(None, call("c2")), result("c2")],
     [system("s"), HI, assistant(BLANK, call("c2")), result("c2")]),
    ("a call without an id cannot be answered and goes",
     [HI, assistant("x", {"type": "function", "function": {"name": "bash", "arguments": "{}"}}), result(None)],
     [HI, assistant("x")]),
]


@pytest.mark.parametrize("name,messages,expected", MESSAGE_CASES, ids=[c[0] for c in MESSAGE_CASES])
def test_message_repairs(name, messages, expected):
    before = copy.deepcopy(messages)
    body = {"model": "databricks-claude-sonnet-4-5", "messages": messages}
    assert repairs.repair_chat_request(body) == {"model": "databricks-claude-sonnet-4-5", "messages": expected}
    assert messages == before, "the input was mutated"


# ---------------------------------------------------------------------------
# Tool schemas: (name, parameters in, parameters out)
# ---------------------------------------------------------------------------

SCHEMA_CASES = [
    ("top-level keywords go",
     {"$schema": "x", "$id": "y", "$comment": "z", "type": "object", "properties": {}, "additionalProperties": False},
     {"type": "object", "properties": {}}),
    ("inside properties, items, anyOf/oneOf/allOf, not, if/then/else",
     {"type": "object", "properties": {
         "a": {"type": "object", "additionalProperties": True, "properties": {"b": {"$comment": "c", "type": "string"}}},
         "l": {"type": "array", "items": {"type": "object", "additionalProperties": False}},
         "t": {"type": "array", "items": [{"$id": "1", "type": "string"}], "prefixItems": [{"$comment": "p"}]},
         "u": {"anyOf": [{"type": "string", "$comment": "s"}, {"type": "null"}],
               "oneOf": [{"additionalProperties": False}], "allOf": [{"$schema": "x"}]},
         "n": {"not": {"$comment": "x", "type": "string"}},
         "c": {"if": {"$id": "i"}, "then": {"$id": "t"}, "else": {"$id": "e"}}}},
     {"type": "object", "properties": {
         "a": {"type": "object", "properties": {"b": {"type": "string"}}},
         "l": {"type": "array", "items": {"type": "object"}},
         "t": {"type": "array", "items": [{"type": "string"}], "prefixItems": [{}]},
         "u": {"anyOf": [{"type": "string"}, {"type": "null"}], "oneOf": [{}], "allOf": [{}]},
         "n": {"not": {"type": "string"}},
         "c": {"if": {}, "then": {}, "else": {}}}}),
    ("properties named like the keywords stay (their schemas are cleaned)",
     {"type": "object", "properties": {
         "$schema": {"type": "string", "$comment": "x"}, "$ref": {"type": "string"}, "$defs": {"type": "object"},
         "$id": {"type": "integer"}, "$comment": {"type": "string"}, "additionalProperties": {"type": "boolean"}},
      "required": ["$id", "additionalProperties"]},
     {"type": "object", "properties": {
         "$schema": {"type": "string"}, "$ref": {"type": "string"}, "$defs": {"type": "object"},
         "$id": {"type": "integer"}, "$comment": {"type": "string"}, "additionalProperties": {"type": "boolean"}},
      "required": ["$id", "additionalProperties"]}),
    ("data is not a schema: enum, const, default and examples keep their keys",
     {"type": "object", "default": {"$id": 1, "additionalProperties": 2},
      "properties": {"k": {"const": {"$ref": "x"}, "examples": [{"$schema": "y"}], "enum": [{"$comment": "z"}]}}},
     {"type": "object", "default": {"$id": 1, "additionalProperties": 2},
      "properties": {"k": {"const": {"$ref": "x"}, "examples": [{"$schema": "y"}], "enum": [{"$comment": "z"}]}}}),
    ("a $ref is replaced by its $defs entry, its siblings win",
     {"type": "object", "$defs": {"Path": {"type": "string", "description": "a path", "$comment": "c"}},
      "properties": {"p": {"$ref": "#/$defs/Path", "description": "where to write"}}},
     {"type": "object", "properties": {"p": {"type": "string", "description": "where to write"}}}),
    ("draft 7 definitions are inlined and go too",
     {"type": "object", "definitions": {"N": {"type": "integer"}}, "properties": {"n": {"$ref": "#/definitions/N"}}},
     {"type": "object", "properties": {"n": {"type": "integer"}}}),
    ("a recursive type stops where it refers to itself",
     {"type": "object", "$defs": {"Node": {"type": "object", "properties": {
         "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
      "properties": {"root": {"$ref": "#/$defs/Node"}}},
     {"type": "object", "properties": {"root": {"type": "object", "properties": {
         "name": {"type": "string"}, "children": {"type": "array", "items": {}}}}}}),
    ("a $ref that points nowhere (or elsewhere) just goes",
     {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}, "b": {"$ref": "https://x/s.json"},
                                       "c": {"$ref": "#"}}},
     {"type": "object", "properties": {"a": {}, "b": {}, "c": {}}}),
    ("boolean schemas stay",
     {"type": "object", "properties": {"any": True, "none": False}, "items": True},
     {"type": "object", "properties": {"any": True, "none": False}, "items": True}),
]


@pytest.mark.parametrize("name,parameters,expected", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_tool_schema_repairs(name, parameters, expected):
    body = {"model": "databricks-gemini-2-5-pro", "messages": [HI],
            "tools": [{"type": "function", "function": {"name": "t", "description": "d", "parameters": parameters}}]}
    before = copy.deepcopy(body)
    repaired = repairs.repair_chat_request(body)
    assert repaired["tools"][0]["function"]["parameters"] == expected
    assert repaired["tools"][0]["function"]["name"] == "t"
    assert body == before, "the input was mutated"


BODY_CASES = [
    ("stream_options goes, everything else stays",
     {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5, "messages": [HI]},
     {"model": "m", "stream": True, "max_tokens": 5, "messages": [HI]}),
    ("tools without parameters, or not functions, stay",
     {"model": "m", "messages": [HI], "tools": [{"type": "function", "function": {"name": "now"}}, {"type": "web"}]},
     {"model": "m", "messages": [HI], "tools": [{"type": "function", "function": {"name": "now"}}, {"type": "web"}]}),
    ("messages that are not all objects are not guessed at",
     {"model": "m", "messages": [user(""), "hi"]},
     {"model": "m", "messages": [user(""), "hi"]}),
    ("a body without messages stays",
     {"model": "m", "prompt": "hi"},
     {"model": "m", "prompt": "hi"}),
]


@pytest.mark.parametrize("name,body,expected", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_body_repairs(name, body, expected):
    assert repairs.repair_chat_request(body) == expected


def test_a_body_that_is_not_an_object_comes_back_as_it_is():
    assert repairs.repair_chat_request(["not", "a", "body"]) == ["not", "a", "body"]


# ---------------------------------------------------------------------------
# Any history comes out in a shape Databricks accepts
# ---------------------------------------------------------------------------

def violations(messages):
    """What Databricks/Anthropic would reject in a message list (the test's own reading of the rules)."""
    found = []
    roles = [m["role"] for m in messages]
    if "user" in roles and roles[[r != "system" for r in roles].index(True)] != "user":
        found.append("the first turn after the system messages is not the user's")
    first_other = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
    if "system" in roles[first_other:]:
        found.append("a system message after the start")
    for i, message in enumerate(messages):
        content, role = message.get("content"), message["role"]
        blank = (content is None or (isinstance(content, str) and not content.strip())
                 or (isinstance(content, list) and not content)
                 or (isinstance(content, list) and any(p.get("type") == "text" and not (p.get("text") or "").strip()
                                                       for p in content)))
        if blank and not (role == "assistant" and message.get("tool_calls") and content == BLANK):
            found.append(f"message {i} has blank text")
        if i and role in ("user", "assistant") and roles[i - 1] == role:
            found.append(f"two {role} messages in a row at {i}")
        if "tool_calls" in message and not message["tool_calls"]:
            found.append(f"message {i} has an empty tool_calls list")
        if role == "assistant" and message.get("tool_calls"):
            answered = []
            j = i + 1
            while j < len(messages) and roles[j] == "tool":
                answered.append(messages[j]["tool_call_id"])
                j += 1
            ids = [c["id"] for c in message["tool_calls"]]
            if sorted(answered) != sorted(ids):
                found.append(f"message {i}'s calls {ids} are answered by {answered}")
        if role == "tool":
            turn = next((messages[j] for j in range(i - 1, -1, -1) if roles[j] != "tool"), {})
            if turn.get("role") != "assistant" or not turn.get("tool_calls"):
                found.append(f"tool message {i} does not follow a tool-calling turn")
    return found


CALL_IDS = st.sampled_from(["c1", "c2", "c3"])
CONTENTS = st.one_of(st.none(), st.sampled_from(["", " ", "\n", "text", "more"]),
                     st.lists(st.sampled_from([text(""), text(" "), text("part"),
                                               {"type": "image_url", "image_url": {"url": "data:,"}}]), max_size=3))
MESSAGES = st.one_of(
    st.builds(lambda c: {"role": "system", "content": c}, CONTENTS),
    st.builds(lambda c: {"role": "user", "content": c}, CONTENTS),
    st.builds(lambda c: {"role": "assistant", "content": c}, CONTENTS),
    st.builds(lambda c, ids: {"role": "assistant", "content": c, "tool_calls": [call(i) for i in ids]},
              CONTENTS, st.lists(CALL_IDS, max_size=3, unique=True)),
    st.builds(lambda c, i: {"role": "tool", "tool_call_id": i, "content": c}, CONTENTS, CALL_IDS),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(MESSAGES, max_size=12))
def test_any_history_comes_out_valid_and_stays_put(messages):
    before = copy.deepcopy(messages)
    repaired = repairs.repair_chat_request({"messages": messages})["messages"]
    assert violations(repaired) == []
    assert repairs.repair_chat_request({"messages": repaired})["messages"] == repaired
    assert messages == before
    if violations(messages) == [] and all(m.get("content") not in ("", " ", "\n", None) for m in messages):
        assert repaired == messages, "a valid history was changed"


# ---------------------------------------------------------------------------
# The log line: structure, never content
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,body,_", AGENT_BODIES, ids=[b[0] for b in AGENT_BODIES])
def test_the_description_names_the_structure_and_no_content(name, body, _):
    described = repairs.describe_chat_request(body)
    for tool in body["tools"]:
        assert tool["function"]["name"] in described
        assert tool["function"]["description"] not in described
    assert body["model"] in described
    assert f"messages={len(body['messages'])}" in described
    for message in body["messages"]:
        assert message["role"] in described
        content = message.get("content")
        for piece in ([content] if isinstance(content, str) else [p.get("text", "") for p in content or []]):
            if len(piece.strip()) > 3:
                assert piece not in described, "content reached the log"
        for c in message.get("tool_calls", []):
            assert c["function"]["name"] in described
            assert c["function"]["arguments"] not in described and c["id"] not in described


def test_the_description_counts_sizes():
    described = repairs.describe_chat_request(
        {"model": "m", "stream": True, "messages": [user("12345"), assistant(None, call("c", "read")),
                                                    user([text("abc"), {"type": "image_url"}])]})
    assert described == "model=m keys=stream messages=3: user(5) assistant(null;read) user(3[2 parts+image_url]) tools=0"
    assert repairs.describe_chat_request("x") == "not a JSON object (str)"


IS_CHAT_CASES = [
    ("/serving-endpoints/chat/completions", True),
    ("/mlflow/v1/chat/completions", True),
    ("/ai-gateway/mlflow/v1/chat/completions?x=1", True),
    ("/v1/chat/completions/", True),
    ("/openai/v1/responses", False),
    ("/anthropic/v1/messages", False),
    ("/mlflow/v1/models", False),
    ("/gemini/v1beta/models/m:streamGenerateContent", False),
    ("/chat/completions-extra", False),
]


@pytest.mark.parametrize("path,expected", IS_CHAT_CASES)
def test_is_chat_completions(path, expected):
    assert repairs.is_chat_completions(path) is expected


# ---------------------------------------------------------------------------
# The SSE filter
# ---------------------------------------------------------------------------

def chunk(delta, finish=None, **extra):
    """One Chat Completions stream chunk as the gateway writes it (json.dumps' default spacing)."""
    return {"id": "chatcmpl-7f3a", "object": "chat.completion.chunk", "created": 1764288000,
            "model": "databricks-claude-opus-4-6",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def sse(data, ending="\n"):
    """An event as the gateway writes it: UTF-8 as is, json.dumps' spacing."""
    return f"data: {json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data}{ending}{ending}"


def start(index, call_id, name, arguments=""):
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def more(index, arguments):
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


USAGE = {"id": "chatcmpl-7f3a", "object": "chat.completion.chunk", "created": 1764288000,
         "model": "databricks-claude-opus-4-6", "choices": [],
         "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240}}
HIDDEN = "databricks-tool-call"
BASH_ARGS = {"command": "ls -la ~/projects/café", "description": "Liste les fichiers — 日本語 🙂"}

# (name, upstream events, expected events): an expected str must come out
# byte for byte; an expected dict is the JSON the event's data must parse to.
STREAM_CASES = [
    ("a text answer passes byte for byte",
     [sse(chunk({"role": "assistant", "content": ""})), sse(chunk({"content": "Voilà — "})),
      sse(chunk({"content": "日本語の説明 🙂"})), sse(chunk({}, "stop")), sse(USAGE), sse("[DONE]")],
     None),
    ("a hidden tool call gets its real name from its arguments",
     [sse(chunk({"role": "assistant", "content": ""})),
      sse(chunk(start(0, "toolu_bdrk_01", HIDDEN))),
      sse(chunk(more(0, '{"name": "bash", "command": "ls -la ~/projects/caf'))),
      sse(chunk(more(0, 'é", "description": "Liste les fichiers — 日本語 🙂"}'))),
      sse(chunk({}, "stop")), sse(USAGE), sse("[DONE]")],
     [sse(chunk({"role": "assistant", "content": ""})),
      chunk(start(0, "toolu_bdrk_01", "bash", json.dumps(BASH_ARGS, ensure_ascii=False))),
      chunk(more(0, "")), chunk(more(0, "")),
      chunk({}, "tool_calls"), sse(USAGE), sse("[DONE]")]),
    ("a hidden tool call whole in one delta",
     [sse(chunk(start(0, "toolu_1", HIDDEN, json.dumps({"name": "read", "filePath": "/a"})))),
      sse(chunk({}, "tool_calls")), sse("[DONE]")],
     [chunk(start(0, "toolu_1", "read", json.dumps({"filePath": "/a"}))),
      sse(chunk({}, "tool_calls")), sse("[DONE]")]),
    ("a named tool call passes; the gateway's stop becomes tool_calls",
     [sse(chunk({"role": "assistant", "content": "Je regarde."})),
      sse(chunk(start(0, "toolu_2", "bash"))), sse(chunk(more(0, '{"command": '))), sse(chunk(more(0, '"ls"}'))),
      sse(chunk({}, "stop")), sse("[DONE]")],
     [sse(chunk({"role": "assistant", "content": "Je regarde."})),
      sse(chunk(start(0, "toolu_2", "bash"))), sse(chunk(more(0, '{"command": '))), sse(chunk(more(0, '"ls"}'))),
      chunk({}, "tool_calls"), sse("[DONE]")]),
    ("two hidden calls in parallel",
     [sse(chunk(start(0, "t0", HIDDEN))), sse(chunk(more(0, '{"name": "read", "filePath": "/a"}'))),
      sse(chunk(start(1, "t1", HIDDEN, '{"filePath": "/b", '))), sse(chunk(more(1, '"name": "read"}'))),
      sse(chunk({}, "stop"))],
     [chunk(start(0, "t0", "read", json.dumps({"filePath": "/a"}))), chunk(more(0, "")),
      chunk(start(1, "t1", "read", json.dumps({"filePath": "/b"}))), chunk(more(1, "")),
      chunk({}, "tool_calls")]),
    ("a hidden call whose arguments name no tool passes as sent",
     [sse(chunk(start(0, "t0", HIDDEN))), sse(chunk(more(0, '{"command": "ls"}'))), sse(chunk({}, "stop"))],
     [sse(chunk(start(0, "t0", HIDDEN))), sse(chunk(more(0, '{"command": "ls"}'))), chunk({}, "tool_calls")]),
    ("a hidden call cut off is let go at the finish, unchanged",
     [sse(chunk({"content": "Un instant."})), sse(chunk(start(0, "t0", HIDDEN))), sse(chunk(more(0, '{"name": "ba'))),
      sse(chunk({}, "length")), sse("[DONE]")],
     None),
    ("comments, event/id/retry lines, non-JSON data and CRLF pass unchanged, in order, around a hidden call",
     [": keep-alive\n\n", "retry: 3000\n\n",
      "event: message\r\nid: 7\r\n" + sse(chunk(start(0, "t0", HIDDEN)), "\r\n"),
      ": still thinking\r\n\r\n",
      "data: not json {\n\n",
      'data: {"choices": [{"index": 0,\ndata:  "delta": {"tool_calls": [{"index": 0, "function": '
      '{"arguments": "{\\"name\\": \\"grep\\", \\"pattern\\": \\"TODO\\"}"}}]}, "finish_reason": null}]}\n\n',
      "data\n\n", sse("[DONE]", "\r")],
     [": keep-alive\n\n", "retry: 3000\n\n",
      ("event: message\r\nid: 7\r\ndata: " + json.dumps(chunk(start(0, "t0", "grep", '{"pattern": "TODO"}')),
                                                         ensure_ascii=False, separators=(",", ":")) + "\r\n\r\n"),
      ": still thinking\r\n\r\n",
      "data: not json {\n\n",
      {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ""}}]},
                    "finish_reason": None}]},
      "data\n\n", sse("[DONE]", "\r")]),
    ("bytes that are not UTF-8 pass exactly",
     ["data: \udcff\udcfe half-broken\n\n", sse(chunk({"content": "ok"}))],
     None),
]

EVENT = re.compile(r"(?:[^\r\n]*(?>\r\n|\r|\n))*?(?>\r\n|\r|\n)")  # lines, then an empty one


def as_bytes(events):
    return "".join(events).encode("utf-8", "surrogateescape")


def run(chunks):
    repair = repairs.ChatStreamRepair()
    return b"".join(repair.feed(c) for c in chunks) + repair.close()


def check(output, expected):
    """The output cut into events, compared with the expected ones."""
    events = EVENT.findall(output.decode("utf-8", "surrogateescape"))
    assert "".join(events).encode("utf-8", "surrogateescape") == output, "output is not whole events"
    assert len(events) == len(expected), events
    for got, want in zip(events, expected):
        if isinstance(want, str):
            assert got == want
        else:
            data = "\n".join(line[5:].removeprefix(" ") for line in re.split(r"\r\n|\r|\n", got)
                             if line.startswith("data:"))
            assert json.loads(data) == want


def expected_of(case):
    _, upstream, expected = case
    return upstream if expected is None else expected


@pytest.mark.parametrize("case", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_stream_whole_and_byte_by_byte(case):
    raw = as_bytes(case[1])
    check(run([raw]), expected_of(case))
    check(run([raw[i:i + 1] for i in range(len(raw))]), expected_of(case))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("case", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_stream_in_random_chunks(case, data):
    raw = as_bytes(case[1])
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=40)))
    bounds = [0, *cuts, len(raw)]
    check(run([raw[a:b] for a, b in zip(bounds, bounds[1:])]), expected_of(case))


def test_each_event_passes_as_soon_as_it_is_complete():
    events = [sse(chunk({"role": "assistant", "content": ""})), sse(chunk({"content": "Grüße 🙂"})),
              ": ping\r\n\r\n", sse(chunk({}, "stop"))]
    repair = repairs.ChatStreamRepair()
    for event in events:
        raw = event.encode()
        assert repair.feed(raw[:-1]) == b"", "a part of an event came out"
        assert repair.feed(raw[-1:]) == raw
    assert repair.close() == b""


def test_a_split_character_comes_out_whole():
    repair = repairs.ChatStreamRepair()
    raw = sse(chunk({"content": "🙂"})).encode()
    split = raw.index("🙂".encode()) + 2
    assert repair.feed(raw[:split]) == b""
    assert repair.feed(raw[split:]) == raw


def test_a_hidden_call_holds_events_only_until_it_is_named():
    repair = repairs.ChatStreamRepair()
    assert repair.feed(sse(chunk({"content": "Je lance."})).encode()) != b""
    assert repair.feed(sse(chunk(start(0, "t0", HIDDEN))).encode()) == b""
    assert repair.feed(sse(chunk(more(0, '{"name": "bash",'))).encode()) == b""
    released = repair.feed(sse(chunk(more(0, ' "command": "make"}'))).encode())
    check(released, [chunk(start(0, "t0", "bash", '{"command": "make"}')), chunk(more(0, "")), chunk(more(0, ""))])
    assert repair.feed(sse(chunk({}, "stop")).encode()) != b"", "held after the name was known"


def test_close_releases_what_is_held_and_an_unfinished_last_event():
    repair = repairs.ChatStreamRepair()
    assert repair.feed((sse(chunk(start(0, "t0", HIDDEN))) + 'data: {"choices": [').encode()) == b""
    out = repair.close()
    assert out == (sse(chunk(start(0, "t0", HIDDEN))) + 'data: {"choices": [').encode()
    assert repair.close() == b""


def test_a_lone_cr_waits_for_what_follows():
    repair = repairs.ChatStreamRepair()
    assert repair.feed(b"data: [DONE]\r\n\r") == b""  # the last CR may be the start of CRLF
    assert repair.feed(b"\n") == b"data: [DONE]\r\n\r\n"
    assert repair.feed(b"data: x\r\r") == b""
    assert repair.feed(b"data: y") == b"data: x\r\r"  # a CR then not LF: it was an empty line
    assert repair.close() == b"data: y"


# ---------------------------------------------------------------------------
# Hostile input: schemas that explode, paths that leave the routes
# ---------------------------------------------------------------------------

def reference_dag(depth):
    """$defs where each entry uses the one before twice: inlined, 2**depth copies of d0."""
    defs = {"d0": {"type": "string", "description": "the leaf"}}
    for i in range(1, depth + 1):
        defs[f"d{i}"] = {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i - 1}"},
                                                          "b": {"$ref": f"#/$defs/d{i - 1}"}}}
    return {"type": "object", "$defs": defs, "properties": {"x": {"$ref": f"#/$defs/d{depth}"}}}


def deep_nesting(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tool_body(parameters):
    return {"model": "databricks-gemini-2-5-pro", "messages": [HI],
            "tools": [{"type": "function", "function": {"name": "t", "description": "d", "parameters": parameters}}]}


def schema_depth(schema):
    depth, level = 0, [schema]
    while level:
        depth += 1
        level = [sub for s in level if isinstance(s, dict) for sub in (s.get("properties") or {}).values()]
    return depth


def test_a_reference_dag_is_inlined_only_as_far_as_the_budget_goes():
    # In a child process with 1.5 GB of address space and 60 s: the old inlining needed 2**40
    # copies (and, in this process, ate 14 GB before it was stopped).
    import resource
    import subprocess

    program = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
               "import coda, test_proxy_repairs as t\n"
               "for depth in (25, 40):\n"
               "    out = coda.repair_chat_request(t.tool_body(t.reference_dag(depth)))\n"
               "    print(json.dumps(json.dumps(out['tools'][0]['function']['parameters'])))\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (1500 * 2 ** 20, 1500 * 2 ** 20))  # noqa: E731
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          preexec_fn=limit)
    assert done.returncode == 0, done.stderr[-2000:]
    schemas = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(schemas) == 2
    for text in schemas:
        assert len(text) < 2 * repairs.SCHEMA_INLINE_CHARACTERS
        assert "$ref" not in text and "$defs" not in text and "{}" in text  # Gemini-clean, open where cut
    assert '"type": "string"' in schemas[0]  # depth 25: inlined down to the leaf as far as the budget went


def test_a_very_deep_schema_is_cut_at_the_depth_limit():
    parameters = deep_nesting(5000)  # far past Python's recursion limit
    cleaned = repairs.clean_schema(parameters, parameters)
    assert schema_depth(cleaned) <= repairs.SCHEMA_MAX_DEPTH + 1


def test_a_huge_legal_schema_comes_out_whole():
    properties = {f"p{i}": {"type": "string", "description": f"property {i}", "additionalProperties": False}
                  for i in range(20000)}
    cleaned = repairs.clean_schema({"type": "object", "properties": properties}, {})
    assert cleaned == {"type": "object", "properties": {name: {"type": "string", "description": p["description"]}
                                                        for name, p in properties.items()}}


def test_a_long_history_is_repaired_in_a_bounded_number_of_passes():
    # 100k messages that each need repairing: linear work, not one pass per message.
    messages = [user(f"question {i}") if i % 2 else assistant("") for i in range(100_000)]
    started = time.process_time()
    repaired = repairs.repair_messages(messages)
    assert violations(repaired) == [] and time.process_time() - started < 30


# Through a real server and a fake upstream that records what arrives.

@pytest.fixture
def proxy_server(start_coda):
    from fake_workspace import FakeWorkspace

    workspace = FakeWorkspace().start()
    # The gateway on the workspace's own origin (as the serving-endpoints generation is): a path that
    # escaped its route would reach the token API there.
    server = start_coda({"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.url,
                         "PAT_ROTATION_INTERVAL": "3600"})
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    server.proxy = f"http://127.0.0.1:{server.proxy_port}"
    key = (server.home / ".coda" / "proxy-key").read_text().strip()
    server.proxy_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    yield server, workspace
    workspace.stop()


HOSTILE_PATHS = [
    "/mlflow/v1/../../api/2.0/token/create",
    "/mlflow/v1/%2e%2e/%2e%2e/api/2.0/token/create",
    "/mlflow/v1/%2E%2E/%2E%2E/api/2.0/token/create",
    "/mlflow/v1/..%2f..%2fapi/2.0/token/create",
    "/mlflow/v1/%252e%252e/%252e%252e/api/2.0/token/create",
    "/mlflow/v1/%25252e%25252e/%25252e%25252e/api/2.0/token/create",
    "/mlflow/v1/..\\..\\api/2.0/token/create",
    "/mlflow/v1/..%5c..%5capi/2.0/token/create",
    "/mlflow/v1/./../../api/2.0/token/list",
    "/mlflow/v1//../../api/2.0/token/list",
    "/mlflow/v1/chat/..;/..;/..;/api/2.0/token/list",
    "/mlflow/v1/...//api/2.0/token/list",
    "/anthropic/../api/2.0/token/list",
    "/openai/v1/%2e%2e/%2e%2e/api/2.0/token/list",
    "/gemini/..%2F..%2Fapi/2.0/token/list",
    "/mlflow/v1/chat/completions%00/../../../api/2.0/token/list",
    "/mlflow/v1/%3f/../../api/2.0/token/list",
    "/mlflow/v1/%23/../../api/2.0/token/list",
    "/mlflow/v1/",
]


def test_hostile_paths_get_an_error_and_nothing_leaves_the_route(proxy_server):
    import http.client

    server, workspace = proxy_server
    tokens_before = len(workspace.tokens)
    seen = len(workspace.requests)
    wrong = []
    for path in HOSTILE_PATHS:
        connection = http.client.HTTPConnection("127.0.0.1", server.proxy_port, timeout=10)
        try:  # http.client sends the path exactly as written (requests would normalise it first)
            connection.request("POST", path, body=b'{"comment": "x"}', headers=server.proxy_headers)
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        try:
            error = json.loads(body).get("error")
        except ValueError:
            error = None
        if not (400 <= answer.status < 500 and isinstance(error, str) and error):
            wrong.append((path, answer.status, body[:200]))
    arrived = [entry["path"] for entry in workspace.requests[seen:]]
    assert wrong == []
    assert arrived == [], "forwarded outside the route base"
    assert len(workspace.tokens) == tokens_before, "a token was minted through the proxy"
    # A plain path under a route still goes through, exactly as it came.
    answer = requests.post(server.proxy + "/mlflow/v1/chat/completions", json=chat_body(), headers=server.proxy_headers,
                           timeout=30)
    assert [entry["path"] for entry in workspace.requests[seen:]] == ["/mlflow/v1/chat/completions"], answer.text


def chat_body(tools=()):
    return {"model": "databricks-gemini-2-5-pro", "messages": [HI], "tools": list(tools)}


def test_a_hostile_schema_does_not_hold_the_proxy_or_the_server(start_coda):
    from fake_workspace import FakeWorkspace

    with FakeWorkspace() as workspace:
        server = start_coda({"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                             "PAT_ROTATION_INTERVAL": "3600"})
        server.api("/api/configure-pat", {"token": workspace.add_token()})
        proxy = f"http://127.0.0.1:{server.proxy_port}"
        key = (server.home / ".coda" / "proxy-key").read_text().strip()
        tools = [{"type": "function", "function": {"name": name, "description": "d", "parameters": schema}}
                 for name, schema in (("dag", reference_dag(25)), ("deep", deep_nesting(400)))]
        answers, stop = [], threading.Event()

        def poll_health():
            while not stop.is_set():
                for url in (proxy + "/health", server.url + "/health"):
                    try:
                        answers.append(requests.get(url, timeout=5).status_code)
                    except requests.RequestException as error:
                        answers.append(repr(error))
                time.sleep(0.05)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        try:
            answer = requests.post(proxy + "/mlflow/v1/chat/completions", json=chat_body(tools), timeout=10,
                                   headers={"Authorization": f"Bearer {key}"})
        finally:
            stop.set()
            poller.join(10)
        assert answer.status_code == 200, answer.text[:300]
        assert answers and all(status == 200 for status in answers), answers
        [forwarded] = workspace.gateway_requests_for(api="chat")
        text = json.dumps(forwarded["body"])
        assert len(text) < 2 * repairs.SCHEMA_INLINE_CHARACTERS and "$ref" not in text
