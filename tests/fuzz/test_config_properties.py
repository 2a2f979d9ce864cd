"""Bad configuration at volume: a ``Config`` or ``ConfigError``, nothing else.

The daemon reads one YAML file and any number of ``--set section.key=value``
overrides. An operator's typo must end in a message naming the key, never
in a traceback: whatever the file holds and whatever the overrides say,
``load_config`` returns a validated ``Config`` or raises ``ConfigError``.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from fuzz_support import TEXT, fuzz_settings, json_like, mutated
from hypothesis import given
from hypothesis import strategies as st
from support import SHIPPED_CONFIG

from kynara_sidecar.config import Config, load_config
from kynara_sidecar.errors import ConfigError

# Large inputs are the point here; hypothesis warns when it prints them.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SHIPPED_TEXT = SHIPPED_CONFIG.read_bytes()
SHIPPED_RAW = yaml.safe_load(SHIPPED_TEXT)
SECTIONS = {
    section: tuple(value) if isinstance(value, dict) else ()
    for section, value in SHIPPED_RAW.items()
}
KNOWN_KEYS = tuple(
    f"{section}.{key}" if key else section
    for section, keys in SECTIONS.items()
    for key in (keys or ("",))
)
# Values an operator might type, right or wrong, as YAML text.
VALUE_TEXTS = (
    "0",
    "-1",
    "65536",
    "1.5",
    ".nan",
    ".inf",
    "true",
    "null",
    "~",
    "''",
    "[]",
    "{}",
    "durable",
    "deferred",
    "verified",
    "development",
    "0x10",
    "1e400",
    "99999999999999999999999",
    "/tmp/x.sock",
    "file://p",
    "nats://x",
    "{team: a}",
    "[1, 2",
    "'unterminated",
    "!!python/object:os.system x",
    "&a [*a]",
)


def check_load(path, overrides: list[str] = ()) -> Config | None:
    """The property: a validated Config, or ConfigError; nothing else."""
    try:
        return load_config(path, list(overrides))
    except ConfigError as err:
        assert str(err), "ConfigError without a message"
        return None


def write(directory, name: str, content: bytes):
    path = directory / name
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("config")


# --- strategies ------------------------------------------------------------

config_keys = st.one_of(st.sampled_from(KNOWN_KEYS), TEXT)


def _edit(raw: dict[str, Any], key: str, value: Any, delete: bool) -> dict[str, Any]:
    section, _, leaf = key.partition(".")
    copy = dict(raw)
    if not leaf:
        if delete:
            copy.pop(section, None)
        else:
            copy[section] = value
        return copy
    inner = copy.get(section)
    inner = dict(inner) if isinstance(inner, dict) else {}
    if delete:
        inner.pop(leaf, None)
    else:
        inner[leaf] = value
    copy[section] = inner
    return copy


@st.composite
def edited_configs(draw) -> dict[str, Any]:
    """The shipped configuration with a few keys set, cleared or added."""
    raw = SHIPPED_RAW
    for _ in range(draw(st.integers(1, 4))):
        value = draw(
            st.one_of(
                st.sampled_from(VALUE_TEXTS).map(_parse_or_text),
                json_like(config_keys, max_leaves=6),
            )
        )
        raw = _edit(raw, draw(config_keys), value, draw(st.booleans()))
    return raw


def _parse_or_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


overrides = st.lists(
    st.one_of(
        st.builds(
            lambda key, value: f"{key}={value}",
            config_keys,
            st.one_of(st.sampled_from(VALUE_TEXTS), TEXT),
        ),
        TEXT,
    ),
    max_size=4,
)


# --- properties ------------------------------------------------------------


@fuzz_settings(300)
@given(raw=edited_configs())
def test_edited_config_files_load_or_name_the_key(config_dir, raw):
    path = write(config_dir, "edited.yaml", yaml.safe_dump(raw).encode())

    check_load(path)


@fuzz_settings(200)
@given(raw=json_like(config_keys, max_leaves=20))
def test_generated_yaml_documents_load_or_are_config_error(config_dir, raw):
    path = write(config_dir, "generated.yaml", yaml.safe_dump(raw).encode())

    check_load(path)


@fuzz_settings(200)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=400))
def test_arbitrary_text_files_load_or_are_config_error(config_dir, text):
    path = write(config_dir, "text.yaml", text.encode())

    check_load(path)


@fuzz_settings(300)
@given(content=mutated(st.just(SHIPPED_TEXT)))
def test_mutated_shipped_config_loads_or_is_config_error(config_dir, content):
    path = write(config_dir, "mutant.yaml", content)

    check_load(path)


@fuzz_settings(300)
@given(sets=overrides)
def test_overrides_apply_or_are_config_error(sets):
    check_load(SHIPPED_CONFIG, sets)


# --- escapes the fuzzers found, each now a named error ------------------------------

DEEP = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize(
    "content",
    [b"agent: {port: 1}\n\xff\xfe\n", SHIPPED_TEXT.replace(b"support-bot", b"\xc3(")],
    ids=["trailing-garbage", "bad-utf8-in-value"],
)
def test_config_file_that_is_not_utf8_is_config_error(tmp_path, content):
    path = write(tmp_path, "kynara.yaml", content)

    with pytest.raises(ConfigError, match="kynara.yaml"):
        load_config(path)


@pytest.mark.parametrize("where", ["file", "override"])
def test_deeply_nested_yaml_is_config_error(tmp_path, where):
    path = write(tmp_path, "kynara.yaml", DEEP.encode())
    args = (path, []) if where == "file" else (SHIPPED_CONFIG, [f"env.labels={DEEP}"])

    with pytest.raises(ConfigError):
        load_config(*args)


@pytest.mark.parametrize("where", ["file", "override"])
def test_socket_path_that_cannot_be_encoded_is_config_error(tmp_path, where):
    text = 'agent: {socket: "\\ud800"}\nidentity: {agent_id: a}\n'
    path = write(tmp_path, "kynara.yaml", text.encode())
    args = (
        (path, []) if where == "file" else (SHIPPED_CONFIG, ['agent.socket="\\ud800"'])
    )

    with pytest.raises(ConfigError, match="socket"):
        load_config(*args)
