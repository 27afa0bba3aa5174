"""YAML -> validated models, reporting every problem as ``FILE:LINE: key.path: message``.

The loader keeps each YAML node's line so that pydantic errors, which only
know a key path, can be pointed at the line a person has to edit. All
problems of one load are collected and raised together.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from proxy import secrets
from proxy.config import presets
from proxy.config.model import (
    POLICY_TARGET_KEYS,
    Credentials,
    HeaderRules,
    ListenAddress,
    MainConfig,
    Policy,
    PolicySettings,
    PolicyTarget,
    Port,
    Route,
    RouteSpec,
    TlsSettings,
    UpstreamTarget,
)
from proxy.tls import client_context
from proxy.webhooks.routes import route_key

KeyPath = tuple[str | int, ...]
Positions = dict[KeyPath, int]


class ConfigError(Exception):
    """One or more problems found while loading; each is a ready-to-print line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Config:
    """A fully validated configuration: the unit that is swapped on reload."""

    path: Path
    main: MainConfig
    policies: tuple[Policy, ...]
    version: str
    """Short content hash of every file read, shown in /config, spans and logs."""
    files: tuple[Path, ...]
    """Every file the config was built from (config, policies, secrets), for reload polling."""


@dataclass
class _Document:
    file: Path
    data: Any
    positions: Positions
    prefix: KeyPath = ()


@dataclass
class _Problems:
    lines: list[str] = field(default_factory=list)

    def add(self, file: Path, line: int, path: KeyPath, message: str) -> None:
        text = f"{file}:{line}: {format_path(path) or '(top level)'}: {message}"
        if text not in self.lines:
            self.lines.append(text)


def format_path(path: Iterable[str | int]) -> str:
    """``a.b[0].c``; a key with a newline or another unprintable character is quoted
    (``a["x\\ny"]``), so that every problem stays one line."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isprintable():
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _lexical(path: Path) -> Path:
    """Absolute and normalised, but symlinks NOT resolved: a Kubernetes ConfigMap swaps its
    ``..data`` symlink, and every later read must follow the new target."""
    return Path(os.path.normpath(path.absolute()))


def _compose(file: Path, problems: _Problems) -> _Document | None:
    """Parse YAML into plain data plus a map from key path to line number."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        problems.add(file, 1, (), f"cannot read file: {exc.strerror}")
        return None
    except UnicodeDecodeError:
        problems.add(file, 1, (), "not UTF-8 text")
        return None
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (control characters)
        line = text.count("\n", 0, exc.position) + 1
        problems.add(file, line, (), f"invalid YAML: character {exc.character:#x} is not allowed")
        return None
    try:
        node = loader.get_single_node()
        positions: Positions = {}
        data = _construct(loader, node, (), positions) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problems.add(file, line, (), f"invalid YAML: {exc.problem or exc.context}")
        return None
    finally:
        loader.dispose()
    return _Document(file, data, positions)


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, positions: Positions) -> Any:
    positions[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # Keys are names, never YAML 1.1 booleans: `on:` (retries.on) must stay "on".
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
            else:
                key = loader.construct_object(key_node, deep=True)
            if key in mapping:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            child = (*path, str(key))
            mapping[key] = _construct(loader, value_node, child, positions)
            positions[child] = key_node.start_mark.line + 1
        return mapping
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, (*path, i), positions) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _friendly(error_type: str, message: str) -> str:
    if error_type == "extra_forbidden":
        return "unknown key"
    if error_type == "missing":
        return "required key is missing"
    return message.removeprefix("Value error, ")


class _Locator:
    """Maps a pydantic error location to the document (and line) that caused it.

    Merged settings are validated as one dict; the most specific document that
    contains the failing key (route, then policy, then defaults) gets the blame.
    """

    def __init__(self, documents: Sequence[_Document]) -> None:
        self.documents = documents

    def report(self, error: ValidationError, problems: _Problems) -> None:
        for item in error.errors():
            self.report_at(item["loc"], _friendly(item["type"], item["msg"]), problems)

    def report_at(self, loc: Sequence[str | int], message: str, problems: _Problems) -> None:
        best: tuple[int, _Document, KeyPath] | None = None
        for doc in self.documents:
            depth, path = _walk(doc.data, loc)
            if best is None or depth > best[0]:
                best = (depth, doc, path)
        assert best is not None
        _, doc, path = best
        full = (*doc.prefix, *path)
        problems.add(doc.file, _line_of(doc, full), full, message)


def _line_of(doc: _Document, path: KeyPath) -> int:
    """The line of `path`, or of its nearest written parent when the key itself is missing."""
    return next((doc.positions[path[:n]] for n in range(len(path), -1, -1) if path[:n] in doc.positions), 1)


def _walk(data: Any, loc: Sequence[str | int]) -> tuple[int, KeyPath]:
    """How far `loc` reaches into `data`; union tags that are not keys are skipped."""
    path: list[str | int] = []
    depth = 0
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            node = node[part]  # type: ignore[index]
            path.append(part)
            depth += 1
        elif isinstance(node, dict | list):
            if isinstance(part, str) and isinstance(node, dict):
                path.append(part)
            break
    return depth, tuple(path)


def _sub(doc: _Document, key: str | int) -> _Document:
    data = doc.data[key] if isinstance(doc.data, dict | list) else None  # type: ignore[index]
    return _Document(doc.file, data, doc.positions, (*doc.prefix, key))


def deep_merge(base: Any, override: Any) -> Any:
    """Mappings merge key by key; anything else in `override` replaces `base`."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value)
        return merged
    return override


M = TypeVar("M", bound=BaseModel)


def _validate(
    model: type[M],
    data: Any,
    documents: Sequence[_Document],
    context: dict[str, Any],
    problems: _Problems,
) -> M | None:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        _Locator(documents).report(error, problems)
        return None


def load_config(path: str | Path) -> Config:
    """Load and validate the main config and every policy file; raise ConfigError listing all problems."""
    config_path = _lexical(Path(path))
    problems = _Problems()
    root = _compose(config_path, problems)
    if root is None:
        raise ConfigError(problems.lines)
    if root.data is None:
        root.data = {}
    if not isinstance(root.data, dict):
        problems.add(config_path, 1, (), "the config file must be a mapping")
        raise ConfigError(problems.lines)
    context = {"base_dir": config_path.parent}
    main = _validate(MainConfig, root.data, [root], context, problems)
    defaults_doc = _sub(root, "defaults") if isinstance(root.data.get("defaults"), dict) else None
    defaults_raw = defaults_doc.data if defaults_doc else {}
    if main is not None and defaults_doc is not None:
        _resources_load(main.defaults, [defaults_doc], context, problems)
    if main is not None:
        _webhook_secrets_load(main, root, context, problems)
        _fleet_secret_load(main, root, context, problems)

    built = [
        (policy, doc)
        for doc in _policy_documents(config_path, root, main, problems)
        if (policy := _build_policy(doc, defaults_raw, defaults_doc, context, problems)) is not None
    ]
    _check_claims(built, root, main, problems)
    if main is not None and main.fleet is None:
        for policy, doc in built:
            _check_fleet_scope(doc, policy.settings, problems)
    if problems.lines or main is None:
        raise ConfigError(problems.lines)
    policies = [policy for policy, _ in built]
    files = watched_files(config_path, main, policies)
    return Config(
        path=config_path,
        main=main,
        policies=tuple(policies),
        version=content_hash(files),
        files=tuple(files),
    )


def _policy_documents(
    config_path: Path, root: _Document, main: MainConfig | None, problems: _Problems
) -> Iterable[_Document]:
    dirs = main.policy_dirs if main else _raw_policy_dirs(root.data)
    for index, entry in enumerate(dirs):
        directory = _lexical(config_path.parent / entry)
        if not directory.is_dir():
            line = root.positions.get(("policy_dirs", index), 1)
            problems.add(config_path, line, ("policy_dirs", index), f"not a directory: {directory}")
            continue
        for file in _policy_files(directory):
            doc = _compose(file, problems)
            if doc is None or doc.data is None:
                continue
            if isinstance(doc.data, dict):
                yield doc
            elif isinstance(doc.data, list):
                yield from (_sub(doc, i) for i in range(len(doc.data)))
            else:
                problems.add(file, 1, (), "a policy file must hold a policy (mapping) or a list of them")


def _raw_policy_dirs(data: dict[str, Any]) -> tuple[str, ...]:
    """Policy folders even when the main config has other errors, so one run reports everything."""
    raw = data.get("policy_dirs", MainConfig.model_fields["policy_dirs"].default)
    is_list = isinstance(raw, list | tuple) and all(isinstance(d, str) for d in raw)
    return tuple(raw) if is_list else ()


def _build_policy(
    doc: _Document,
    defaults_raw: dict[str, Any],
    defaults_doc: _Document | None,
    context: dict[str, Any],
    problems: _Problems,
) -> Policy | None:
    """One policy over its preset, with `defaults` merged in (built-in < defaults < preset < policy <
    route). Its target, its settings and each route are validated independently, so one bad part
    hides no problem in another."""
    if not isinstance(doc.data, dict):
        problems.add(doc.file, doc.positions.get(doc.prefix, 1), doc.prefix, "a policy must be a mapping")
        return None
    written = {k: v for k, v in doc.data.items() if k != presets.PRESET_KEY}
    preset_doc: _Document | None = None
    if presets.PRESET_KEY in doc.data:
        preset_doc = _preset_document(doc, problems)
        if preset_doc is None:
            return None
    data = deep_merge(preset_doc.data, written) if preset_doc else written
    own = [doc, preset_doc] if preset_doc else [doc]
    inherited = [defaults_doc] if defaults_doc else []
    # a list of routes is validated item by item below; anything else is left to PolicyTarget to reject
    raw_routes = data.get("routes")
    routes_doc = preset_doc if preset_doc and "routes" not in written else doc
    route_docs = (
        [_sub(_sub(routes_doc, "routes"), i) for i in range(len(raw_routes))]
        if isinstance(raw_routes, list)
        else None
    )
    target_raw = {
        k: v
        for k, v in data.items()
        if k in POLICY_TARGET_KEYS and not (k == "routes" and route_docs is not None)
    }
    settings_raw = deep_merge(defaults_raw, {k: v for k, v in data.items() if k not in POLICY_TARGET_KEYS})
    target = _validate(PolicyTarget, target_raw, own, context, problems)
    settings = _validate(PolicySettings, settings_raw, [*own, *inherited], context, problems)
    if settings is not None and not _resources_load(settings, [*own, *inherited], context, problems):
        settings = None
    routes = [
        _build_route(route_doc, settings_raw, [*own, *inherited], context, problems)
        for route_doc in route_docs or ()
    ]
    if target is None or settings is None or None in routes:
        return None
    _check_failover_primary(doc, target.upstream, settings, problems)
    return Policy(
        hosts=target.hosts,
        upstream=target.upstream,
        listen=target.listen,
        settings=settings,
        routes=tuple(route for route in routes if route is not None),
        source=f"{doc.file}:{doc.positions.get(doc.prefix, 1)}",
        preset=None if preset_doc is None else preset_doc.file.stem,
    )


def _preset_document(doc: _Document, problems: _Problems) -> _Document | None:
    """The preset a policy names, parsed; None (with the problem reported) when there is none such."""
    name = doc.data[presets.PRESET_KEY]
    file = presets.path_of(name) if isinstance(name, str) else None
    if file is None:
        at = (*doc.prefix, presets.PRESET_KEY)
        problems.add(
            doc.file,
            _line_of(doc, at),
            at,
            f"unknown preset {name!r}: use one of {', '.join(presets.names())}",
        )
        return None
    preset = _compose(file, problems)
    if preset is None or not isinstance(preset.data, dict):
        if preset is not None:
            problems.add(file, 1, (), "a preset file must hold one policy (a mapping)")
        return None
    return preset


def _check_failover_primary(
    doc: _Document, primary: UpstreamTarget | None, settings: PolicySettings, problems: _Problems
) -> None:
    """A failover upstream that is the primary itself would share nothing but its name (SPEC 9)."""
    if settings.failover is None or primary is None:
        return
    for index, upstream in enumerate(settings.failover.upstreams):
        if upstream.url == primary:
            path = (*doc.prefix, "failover", "upstreams", index, "url")
            problems.add(
                doc.file,
                _line_of(doc, path),
                path,
                f"{primary} is this policy's upstream already: list only the other upstreams",
            )


def _check_fleet_scope(doc: _Document, settings: PolicySettings, problems: _Problems) -> None:
    """``scope: fleet`` needs the main config's ``fleet`` section, or there is nothing to share."""
    for section in ("rate_limit", "circuit_breaker"):
        value = getattr(settings, section)
        if value is not None and value.scope == "fleet":
            path = (*doc.prefix, section, "scope")
            message = "scope: fleet needs a fleet section (fleet.redis) in the main config"
            problems.add(doc.file, _line_of(doc, path), path, message)


def _build_route(
    doc: _Document,
    settings_raw: dict[str, Any],
    inherited: Sequence[_Document],
    context: dict[str, Any],
    problems: _Problems,
) -> Route | None:
    """One route: its match, then the policy's raw settings with its overrides merged in
    (blame goes to the route first, then the policy, then defaults)."""
    spec = _validate(RouteSpec, doc.data, [doc], context, problems)
    if spec is None:
        return None
    merged = deep_merge(settings_raw, spec.overrides())
    settings = _validate(PolicySettings, merged, [doc, *inherited], context, problems)
    if settings is not None and not _resources_load(settings, [doc, *inherited], context, problems):
        return None
    return None if settings is None else Route(match=spec.match, settings=settings)


def _resources_load(
    settings: PolicySettings,
    documents: Sequence[_Document],
    context: dict[str, Any],
    problems: _Problems,
) -> bool:
    """What the models cannot check without touching files (config stays data): every TLS section
    loads and every header secret renders, so a missing file fails at load, not on the first
    request. Reported at the key that names it; False when anything failed."""
    base_dir: Path = context["base_dir"]
    found: list[tuple[KeyPath, str]] = []

    def check_tls(tls: TlsSettings, at: KeyPath) -> None:
        try:
            client_context(tls)
        except (ssl.SSLError, OSError) as exc:
            found.append((at, f"cannot load TLS files: {exc}"))

    def check_headers(rules: HeaderRules, at: KeyPath) -> None:
        for name, template in rules.set.items():
            try:
                secrets.render(template, base_dir)
            except secrets.SecretError as exc:
                found.append(((*at, "set", name), str(exc)))

    def check_credentials(credentials: Credentials) -> None:
        for at, template in credentials.secret_templates():
            try:
                secrets.render(template, base_dir)
            except secrets.SecretError as exc:
                found.append((("credentials", *at), str(exc)))

    check_tls(settings.tls, ("tls",))
    check_headers(settings.headers, ("headers",))
    if settings.credentials is not None:
        check_credentials(settings.credentials)
    for index, upstream in enumerate(settings.failover.upstreams if settings.failover else ()):
        check_headers(upstream.headers, ("failover", "upstreams", index, "headers"))
        if upstream.tls is not None:
            check_tls(upstream.tls, ("failover", "upstreams", index, "tls"))
    locator = _Locator(documents)
    for at, message in found:
        locator.report_at(at, message, problems)
    return not found


def webhook_secret_templates(main: MainConfig) -> Iterable[tuple[KeyPath, str, str]]:
    """(key path, scheme, template) of every webhook secret, as written."""
    for index, route in enumerate(main.webhooks.routes if main.webhooks is not None else ()):
        at: KeyPath = ("webhooks", "routes", index, "verify")
        verify = route.verify
        if verify.secret is not None:
            yield (*at, "secret"), verify.scheme, verify.secret
        for number, template in enumerate(verify.secrets or ()):
            yield (*at, "secrets", number), verify.scheme, template


def _webhook_secrets_load(
    main: MainConfig, root: _Document, context: dict[str, Any], problems: _Problems
) -> None:
    """Every webhook secret renders into a key now, so a missing file fails at load, not on the
    first webhook (reported at the key that names it; the message never holds the secret)."""
    for at, scheme, template in webhook_secret_templates(main):
        try:
            route_key(scheme, template, context["base_dir"])
        except ValueError as exc:  # SecretError is one
            problems.add(root.file, _line_of(root, at), at, str(exc))


def _fleet_secret_load(
    main: MainConfig, root: _Document, context: dict[str, Any], problems: _Problems
) -> None:
    """A ``${env:}``/``${file:}`` in ``fleet.redis`` must resolve now, not when Redis is first needed."""
    if main.fleet is None or not secrets.has_reference(main.fleet.redis):
        return
    try:
        secrets.render(main.fleet.redis, context["base_dir"])
    except secrets.SecretError as exc:
        at: KeyPath = ("fleet", "redis")
        problems.add(root.file, _line_of(root, at), at, str(exc))


def _check_claims(
    built: Sequence[tuple[Policy, _Document]],
    root: _Document,
    main: MainConfig | None,
    problems: _Problems,
) -> None:
    """Cross-file rules: a host claimed once; the main, admin and policy listen ports all distinct."""
    listen, admin = _main_ports(root, main)
    if listen == admin:
        # blame the admin port when it is written, else the listen port that ran into the default
        key = "admin" if ("admin", "port") in root.positions else "listen"
        problems.add(
            root.file,
            _line_of(root, (key, "port")),
            (key, "port"),
            f"listen and admin both use port {listen}",
        )
    ports: dict[int, str] = {listen: "used by the main listener", admin: "used by the admin listener"}
    claimed: dict[str, str] = {}
    webhooks = main.webhooks if main is not None else None
    if webhooks is not None:
        at: KeyPath = ("webhooks", "listen", "port")
        port = webhooks.listen.port
        if port in ports:
            problems.add(root.file, _line_of(root, at), at, f"port {port} is already {ports[port]}")
        else:
            ports[port] = "used by the webhook listener"

    def claim(
        owners: dict[Any, str], key: Any, doc: _Document, path: KeyPath, what: str, source: str
    ) -> None:
        if key in owners:
            problems.add(doc.file, _line_of(doc, path), path, f"{what} is already {owners[key]}")
        else:
            owners[key] = source

    for policy, doc in built:
        for index, host in enumerate(policy.hosts):
            claim(
                claimed,
                host,
                doc,
                (*doc.prefix, "hosts", index),
                f"host {host}",
                f"claimed by {policy.source}",
            )
        if policy.listen is not None:
            claim(
                ports,
                policy.listen,
                doc,
                (*doc.prefix, "listen"),
                f"port {policy.listen}",
                f"used by {policy.source}",
            )


def _main_ports(root: _Document, main: MainConfig | None) -> tuple[int, int]:
    """The main and admin listen ports: validated, else as written when that is a valid port, else
    the defaults, so policy ports are checked even when the main config has other errors."""
    if main is not None:
        return main.listen.port, main.admin.port
    return _raw_port(root.data, "listen"), _raw_port(root.data, "admin")


_PORT: TypeAdapter[int] = TypeAdapter(Port)


def _raw_port(data: dict[str, Any], section: str) -> int:
    """``<section>.port`` as written when it is a valid port, else the built-in default."""
    default: ListenAddress = MainConfig.model_fields[section].default
    written = data.get(section)
    try:
        return _PORT.validate_python(written.get("port")) if isinstance(written, dict) else default.port
    except ValidationError:
        return default.port


def watched_files(config_path: Path, main: MainConfig, policies: Sequence[Policy]) -> list[Path]:
    """Every file a config depends on: itself, every policy file in its folders, referenced secrets."""
    policy_files = [
        file
        for entry in main.policy_dirs
        if (directory := _lexical(config_path.parent / entry)).is_dir()
        for file in _policy_files(directory)
    ]
    preset_files = sorted(
        {file for p in policies if p.preset and (file := presets.path_of(p.preset)) is not None}
    )
    return [config_path, *policy_files, *preset_files, *_secret_files(main, policies, config_path)]


def current_fingerprint(config: Config) -> str:
    """The content hash of what `config` depends on as it is on disk now (new policy files included);
    equal to `config.version` while nothing changed."""
    return content_hash(watched_files(config.path, config.main, config.policies))


def _policy_files(directory: Path) -> list[Path]:
    """YAML files only; dot-entries (Kubernetes' ..data, editors' swap files) are skipped."""
    return sorted(
        f for f in directory.iterdir() if f.suffix in (".yaml", ".yml") and not f.name.startswith(".")
    )


def _secret_files(main: MainConfig, policies: Sequence[Policy], config_path: Path) -> list[Path]:
    """Files whose rotation must reach running requests: ``${file:...}`` secrets (headers and
    webhook routes) and TLS material."""
    settings = [
        main.defaults,
        *(p.settings for p in policies),
        *(r.settings for p in policies for r in p.routes),
    ]
    rules = [s.headers for s in settings]
    tls_sections = [s.tls for s in settings]
    for failover in [s.failover for s in settings if s.failover is not None]:
        rules.extend(upstream.headers for upstream in failover.upstreams)
        tls_sections.extend(upstream.tls for upstream in failover.upstreams if upstream.tls is not None)
    templates = [
        *(template for r in rules for template in r.set.values()),
        *(
            template
            for s in settings
            if s.credentials is not None
            for _, template in s.credentials.secret_templates()
        ),
        *(template for _, _, template in webhook_secret_templates(main)),
    ]
    found = {
        file for template in templates for file in secrets.referenced_files(template, config_path.parent)
    }
    tls_files = {
        file
        for tls in tls_sections
        for file in (tls.ca_file, tls.client_cert, tls.client_key)
        if file is not None
    }
    return sorted(found | tls_files)


def content_hash(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file).encode())
        try:
            digest.update(file.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()[:12]
