r"""Patterns for secrets moat did not issue: the regexes of detect-secrets' plugins.

Trust domain: host engine. The regexes are detect-secrets' own (Yelp's maintained rule set,
loaded from its installed plugin classes: ``Plugin().denylist``), not a hand-typed list, so
they follow upstream fixes with the package version. moat adds three things per rule, all
performance or span details that never change *what* a regex matches:

* ``gate``: literals one of which every match contains; a text without any skips the rule
  (``str.__contains__`` runs at GB/s, a regex starting with a character class does not);
* ``anchor``: for rules whose regex starts with a character class (Telegram, Discord,
  Mailchimp), a literal-led regex finds candidates and the upstream regex is run in a
  window around each one, so the upstream regex still decides;
* ``group``/``extend``: which part to redact (the password of ``user:pass@``, the secret
  after ``aws_secret_key=``) and, for JWTs, the signature the upstream regex leaves out
  (it ends in a lazy ``*?``).

Linear time (issue 17 §3): every rule runs on RE2 (``google-re2``: an automaton, no
backtracking, time linear in the text) over the UTF-8 bytes of the text, never on Python's
backtracking ``re``: two upstream rules (npm, JWT) and the keyword rules' ``" *(?: +) *"``
took quadratic or cubic time there. RE2 lacks lookarounds; ``_re2_source`` rewrites the few
upstream ones into consuming equivalents (the redacted span is unchanged), and the one rule
RE2 cannot take (``ip_public``, opt-in, every repetition bounded) stays on ``re``. RE2's
``\d``/``\w``/``\s`` are ASCII (Python's are Unicode): secrets are ASCII.

A few token formats detect-secrets 1.5 does not know (GitHub fine-grained tokens, Google API
keys, Anthropic keys, whole private-key blocks) are added as ``SUPPLEMENT`` rules, each with
a comment on why.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from moat.errors import PolicyError
from moat.guard.literals import LiteralSet, backend

try:
    import re2
except ImportError:  # pragma: no cover - a hard dependency; fail closed in load_rules
    re2 = None


class Match(Protocol):
    """What the rules need of a match (``re.Match[bytes]`` and RE2's match alike)."""

    def span(self, group: int = 0) -> tuple[int, int]: ...

    def end(self, group: int = 0) -> int: ...


class Matcher(Protocol):
    """A compiled rule regex over bytes: ``re.Pattern[bytes]`` or an RE2 regexp."""

    def finditer(self, data: bytes, pos: int = ..., endpos: int = ...) -> Iterator[Match]: ...

    def match(self, data: bytes, pos: int = ..., endpos: int = ...) -> Match | None: ...


@dataclass(frozen=True)
class Rule:
    """One regex detector. ``name`` is the label of its findings.

    ``pattern`` runs on UTF-8 bytes (offsets are byte offsets); ``source`` is the upstream
    regex it was made from; ``engine`` is ``"re2"`` (linear time) or ``"re"``.
    """

    name: str
    pattern: Matcher
    source: re.Pattern[str]
    engine: str = "re2"
    groups: int = 0
    group: int = 0
    gate: tuple[str, ...] = ()
    gate_window: int = 0  # >0: every match starts at a gate literal and is this short
    anchor: re.Pattern[bytes] | None = None
    anchor_width: int = 0  # >0: every anchor match is this long (searched by hyperscan)
    before: int = 0  # how far a match may start before its anchor
    after: int = 0  # how far a match may end after its anchor's end
    extend: re.Pattern[bytes] | None = None
    region: Matcher | None = None  # RE2: every match lies in one of its matches (+1 byte)

    @property
    def detector(self) -> str:
        """The ``Finding.detector`` of this rule's matches."""
        return f"rule:{self.name}"


def _cases(word: str) -> tuple[str, ...]:
    """Every upper/lower-case spelling of a short literal: the gates of IGNORECASE rules."""
    out = [""]
    for ch in word:
        out = [p + c for p in out for c in dict.fromkeys((ch.lower(), ch.upper()))]
    return tuple(out)


# (plugin module, class, {pattern index: per-pattern options}); indexes follow `denylist`.
_DETECT_SECRETS: dict[str, tuple[str, str, dict[int, dict[str, object]]]] = {
    "aws": (
        "aws",
        "AWSKeyDetector",
        {
            0: {"gate": ("A3T", "ABIA", "ACCA", "AKIA", "ASIA")},
            # IGNORECASE, starts with "aws", at most 93 characters long.
            1: {"gate": _cases("aws"), "gate_window": 96, "group": 1},
        },
    ),
    "azure_storage_key": (
        "azure_storage_key",
        "AzureStorageKeyDetector",
        {0: {"gate": ("AccountKey=",)}},
    ),
    "basic_auth": ("basic_auth", "BasicAuthDetector", {0: {"gate": ("://",), "group": 1}}),
    "discord": (
        "discord",
        "DiscordBotTokenDetector",
        {
            0: {
                "anchor": r"\.[a-zA-Z\d_-]{6}\.[a-zA-Z\d_-]{27}",
                "anchor_width": 35,
                "before": 26,
                "after": 0,
            }
        },
    ),
    "github_token": (
        "github_token",
        "GitHubTokenDetector",
        {0: {"gate": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")}},
    ),
    "gitlab_token": (
        "gitlab_token",
        "GitLabTokenDetector",
        {
            0: {"gate": ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-")},
            1: {"gate": ("GR1348941",)},
            2: {"gate": ("glcbt-",)},
            3: {"gate": ("glimt-",)},
            4: {"gate": ("glptt-",)},
            5: {"gate": ("glagent-",)},
            6: {"gate": ("gloas-",)},
        },
    ),
    "jwt": (
        "jwt",
        "JwtTokenDetector",
        {0: {"gate": ("eyJ",), "extend": r"[A-Za-z0-9\-_.+/=]*"}},
    ),
    "mailchimp": (
        "mailchimp",
        "MailchimpDetector",
        {
            0: {
                "gate": ("-us",),
                "anchor": r"-us[0-9]",
                "anchor_width": 4,
                "before": 32,
                "after": 1,
            }
        },
    ),
    "npm": ("npm", "NpmDetector", {0: {"gate": ("_authToken=",), "group": 1}}),
    "openai": ("openai", "OpenAIDetector", {0: {"gate": ("T3BlbkFJ",)}}),
    "private_key": ("private_key", "PrivateKeyDetector", {i: {} for i in range(8)}),
    "pypi_token": (
        "pypi_token",
        "PypiTokenDetector",
        {0: {"gate": ("pypi-",)}, 1: {"gate": ("pypi-",)}},
    ),
    "sendgrid": ("sendgrid", "SendGridDetector", {0: {"gate": ("SG.",)}}),
    "slack": (
        "slack",
        "SlackDetector",
        # IGNORECASE; unbounded upstream, capped at 256 characters (Slack's are ~80).
        {
            0: {"gate": _cases("xox"), "gate_window": 256},
            1: {"gate": _cases("hooks"), "gate_window": 256},
        },
    ),
    "square_oauth": ("square_oauth", "SquareOAuthDetector", {0: {"gate": ("sq0csp-",)}}),
    "stripe": ("stripe", "StripeDetector", {0: {"gate": ("k_live_",)}}),
    "telegram_token": (
        "telegram_token",
        "TelegramBotTokenDetector",
        {0: {"anchor": r":[0-9A-Za-z_-]{35}", "anchor_width": 36, "before": 10, "after": 0}},
    ),
    "twilio": (
        "twilio",
        "TwilioKeyDetector",
        {0: {"gate": ("AC",), "gate_window": 34}, 1: {"gate": ("SK",), "gate_window": 34}},
    ),
    # Opt-in only: keyword-context rules (they match the *name* "ibm_key", not the secret),
    # an all-caps pattern that flags ordinary words, and public IP addresses (not secrets).
    "artifactory": ("artifactory", "ArtifactoryDetector", {0: {}, 1: {}}),
    "cloudant": ("cloudant", "CloudantDetector", {0: {}, 1: {}, 2: {}, 3: {}}),
    "ibm_cloud_iam": ("ibm_cloud_iam", "IbmCloudIamDetector", {0: {}}),
    "ibm_cos_hmac": ("ibm_cos_hmac", "IbmCosHmacDetector", {0: {}}),
    # Runs on ``re`` (RE2 has no lookarounds), only within runs of digits, dots and colons
    # that RE2 finds: every match is made of those characters (linear: see _RE_ENGINE).
    "ip_public": ("ip_public", "IPPublicDetector", {0: {"region": r"[0-9][0-9.:]*"}}),
    "softlayer": ("softlayer", "SoftlayerDetector", {0: {}, 1: {}}),
}
_PRIVATE_KEY_GATE = ("PRIVATE KEY", "PuTTY-User-Key-File-2")

#: Formats detect-secrets 1.5 lacks. Kept short on purpose; each names its source format.
_SUPPLEMENT: dict[str, list[dict[str, object]]] = {
    # GitHub fine-grained PATs: "github_pat_" + 82 characters (GitHub's token format docs).
    "github_pat": [{"pattern": r"github_pat_[A-Za-z0-9_]{82}", "gate": ("github_pat_",)}],
    # Google API keys: "AIza" + 35 characters.
    "google_api_key": [{"pattern": r"AIza[0-9A-Za-z_\-]{35}", "gate": ("AIza",)}],
    # Anthropic API keys: "sk-ant-api03-..." / "sk-ant-admin01-...".
    "anthropic": [{"pattern": r"sk-ant-[a-z]+\d\d-[A-Za-z0-9_\-]{80,}", "gate": ("sk-ant-",)}],
    # The whole PEM/OpenSSH block, not only its header (detect-secrets flags the header
    # line; the key material below it is what must not leak). Capped at 16 KiB so a header
    # without an END line redacts a bounded region in streams and whole texts alike.
    "private_key_block": [
        {
            # Header on RE2; the body (to the END line, else 16 KiB) is the rule's
            # extension, matched from the header's end (see ``rule_hits``: linear).
            "pattern": r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----",
            "extend": r"[\s\S]{0,16384}?-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
            r"|[\s\S]{0,16384}",
            "gate": ("PRIVATE KEY",),
        }
    ],
}

#: Rules on by default: every token rule of detect-secrets plus the supplement.
DEFAULT_RULES: tuple[str, ...] = (
    "aws",
    "azure_storage_key",
    "basic_auth",
    "discord",
    "github_token",
    "gitlab_token",
    "jwt",
    "mailchimp",
    "npm",
    "openai",
    "private_key",
    "pypi_token",
    "sendgrid",
    "slack",
    "square_oauth",
    "stripe",
    "telegram_token",
    "twilio",
    *_SUPPLEMENT,
)
ALL_RULES: frozenset[str] = frozenset(_DETECT_SECRETS) | frozenset(_SUPPLEMENT)

#: Longest span a rule match is expected to need; streams hold back at least this much.
RULE_WINDOW = 1024


#: Python's Unicode ``\\w`` in RE2 terms (letters, numbers, underscore).
_WORD = r"\p{L}\p{N}_"
#: Upstream lookarounds and their consuming RE2 spellings: ``(prefix, suffix)`` of a group
#: wrapped around the rest of the pattern, so that group (the old match) is what is redacted.
_LOOKBEHIND_NONWORD = "(?:(?<=\\W)|(?<=^))"
_LOOKAHEAD_NONWORD = "(?!\\w)"
_LOOKAHEAD_CLASS = re.compile(r"\(\?!\[([^\]^]*)\]\)\)")
#: Rules RE2 cannot take, run on ``re`` instead; each must be linear there (every
#: repetition bounded, fixed-width lookarounds): proven by ``tests/test_guard_linear.py``.
_RE_ENGINE = frozenset({"ip_public"})


_LONG_REPEAT = re.compile(r"(\[[^\]]*\])\{(\d+),(\d+)\}(?!\?)")


def _split_repeat(m: re.Match[str]) -> str:
    atom, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
    if hi <= 1000:
        return m.group(0)
    return f"{atom}{{{lo},1000}}{atom}{{0,{hi - 1000}}}"


def _re2_source(pattern: re.Pattern[str]) -> tuple[str, int]:
    """An RE2 spelling of ``pattern`` and how far its group numbers shift (0 or 1).

    Lookarounds become consuming groups outside a new group 1 that holds what the upstream
    regex matched (a delimiter is consumed instead of looked at). Raises ``ValueError``
    for anything else RE2 would refuse or read differently.
    """
    src = pattern.pattern
    if pattern.flags & re.VERBOSE and re.search(r"[\s#]", src):
        raise ValueError("verbose pattern")  # (without spaces or comments, VERBOSE is moot)
    prefix = suffix = ""
    if src.startswith(_LOOKBEHIND_NONWORD):
        src = src[len(_LOOKBEHIND_NONWORD) :]
        prefix = f"(?:^|[^{_WORD}])"
    if src.endswith(_LOOKAHEAD_NONWORD):
        src = src[: -len(_LOOKAHEAD_NONWORD)]
        suffix = f"(?:[^{_WORD}]|\\z)"
    # IBM's keys: "(KEY(?![class]))": the key, not followed by another key character.
    src = _LOOKAHEAD_CLASS.sub(r")(?:[^\1]|\\z)", src)
    if "(?=" in src or "(?!" in src or "(?<" in src:
        raise ValueError("lookaround")
    # RE2 caps a counted repetition at 1,000: X{m,n} is X{m,1000}X{0,n-1000} (same strings,
    # and greedy both ways: the longest acceptable length is still tried first).
    src = _LONG_REPEAT.sub(_split_repeat, src)
    shift = 1 if prefix or suffix else 0
    if shift:
        src = f"{prefix}({src}){suffix}"
    if pattern.flags & re.IGNORECASE:
        src = "(?i)" + src
    return src, shift


def _compile(name: str, pattern: re.Pattern[str], group: int) -> tuple[Matcher, str, int, int]:
    """The linear-time matcher of an upstream regex: ``(matcher, engine, groups, group)``."""
    if re2 is None:
        raise PolicyError("the guard's secret-pattern rules need the google-re2 package")
    try:
        src, shift = _re2_source(pattern)
    except ValueError:
        if name not in _RE_ENGINE:
            # Upstream changed a rule into something RE2 can't run: fail closed rather than
            # run it on a backtracking engine unreviewed (invariant 7).
            raise PolicyError(f"guard rule {name!r} needs a linear-time spelling") from None
        src = ""
    if src:
        opts = re2.Options()
        opts.max_mem = 64 << 20  # room for the DFA; past it RE2 stays linear (NFA)
        try:
            compiled = re2.compile(src.encode(), opts)
        except re2.error as exc:
            raise PolicyError("a guard rule does not compile for RE2") from exc
        return compiled, "re2", compiled.groups, group + shift
    flags = pattern.flags & ~re.UNICODE
    return re.compile(pattern.pattern.encode(), flags), "re", pattern.groups, group


def _region(pattern: str) -> Matcher:
    if re2 is None:
        raise PolicyError("the guard's secret-pattern rules need the google-re2 package")
    compiled: Matcher = re2.compile(pattern.encode())
    return compiled


def _options(name: str, pattern: re.Pattern[str], opts: dict[str, object]) -> Rule:
    anchor = opts.get("anchor")
    extend = opts.get("extend")
    region = opts.get("region")
    gate = opts.get("gate", ())
    gate_window = opts.get("gate_window", 0)
    group = opts.get("group", 0)
    before = opts.get("before", 0)
    after = opts.get("after", 0)
    anchor_width = opts.get("anchor_width", 0)
    if (
        not isinstance(gate, tuple)
        or not isinstance(gate_window, int)
        or not isinstance(group, int)
    ):
        raise PolicyError("guard rule table is malformed")
    if (
        not isinstance(before, int)
        or not isinstance(after, int)
        or not isinstance(anchor_width, int)
    ):
        raise PolicyError("guard rule table is malformed")
    matcher, engine, groups, group = _compile(name, pattern, group)
    return Rule(
        name=name,
        pattern=matcher,
        source=pattern,
        engine=engine,
        groups=groups,
        group=group,
        gate=tuple(str(g) for g in gate),
        gate_window=gate_window,
        anchor=re.compile(anchor.encode()) if isinstance(anchor, str) else None,
        anchor_width=anchor_width,
        before=before,
        after=after,
        extend=re.compile(extend.encode()) if isinstance(extend, str) else None,
        region=_region(region) if isinstance(region, str) else None,
    )


class RuleSet:
    """Rules plus one literal set over all their gate literals, so that a text is searched
    for every gate in one pass and only the rules whose gate is present run."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        literals = sorted({g for r in rules for g in r.gate})
        # With hyperscan, the anchors of fixed width (all of the default rules') are found in
        # the same pass as the gates, instead of one Python regex pass over the text each.
        self._hs_anchored: dict[int, int] = {}  # rule index -> its number among patterns
        patterns: list[tuple[bytes, int]] = []
        if backend() == "hyperscan":
            for r, rule in enumerate(rules):
                if rule.anchor is not None and rule.anchor_width > 0:
                    self._hs_anchored[r] = len(patterns)
                    patterns.append((rule.anchor.pattern, rule.anchor_width))
        self._pattern_rule = list(self._hs_anchored)
        self._n_literals = len(literals)
        self._gates = (
            LiteralSet([g.encode() for g in literals], patterns=patterns)
            if literals or patterns
            else None
        )
        # Per gate literal, the (indexes of the) rules it opens.
        number = {g: i for i, g in enumerate(literals)}
        self._opens: list[list[int]] = [[] for _ in literals]
        for r, rule in enumerate(rules):
            for g in rule.gate:
                self._opens[number[g]].append(r)
        self._ungated = [r for r, rule in enumerate(rules) if not rule.gate]

    def candidates(
        self, data: bytes
    ) -> list[tuple[Rule, list[int] | None, list[tuple[int, int]] | None]]:
        """The rules that may match ``data`` (UTF-8), in rule order, each with: the byte
        offsets where its gate occurs (for ``gate_window`` rules), or None where the whole
        text must be searched; and the byte spans of its anchor's matches when the gate pass
        found them, or None where the rule's anchor regex must search."""
        where: dict[int, list[int]] = {}
        spans: dict[int, list[tuple[int, int]]] = {}
        if self._gates is not None:
            n = self._n_literals
            for i, start in self._gates.find(data):
                if i < n:
                    for r in self._opens[i]:
                        where.setdefault(r, []).append(start)
                else:
                    r = self._pattern_rule[i - n]
                    spans.setdefault(r, []).append((start, start + self.rules[r].anchor_width))
        for r in self._ungated:
            if r in self._hs_anchored and r not in spans:
                continue  # its anchor, searched with the gates, is not in the text
            where.setdefault(r, [])
        out: list[tuple[Rule, list[int] | None, list[tuple[int, int]] | None]] = []
        for r in sorted(where):
            rule = self.rules[r]
            anchors: list[tuple[int, int]] | None = None
            if r in self._hs_anchored:
                if r not in spans:
                    continue  # gated, but its anchor is not in the text
                anchors = spans[r]
            offsets = sorted(where[r]) if rule.gate_window else None
            out.append((rule, offsets, anchors))
        return out


@cache
def rule_set(names: frozenset[str]) -> RuleSet:
    """The ``RuleSet`` of ``names`` (cached, immutable)."""
    return RuleSet(load_rules(names))


@cache
def load_rules(names: frozenset[str]) -> tuple[Rule, ...]:
    """The compiled rules for ``names`` (cached: the rule set is immutable once loaded).

    Raises ``PolicyError`` when detect-secrets is missing or its plugins changed shape:
    the guard fails closed rather than running without its pattern rules (invariant 7).
    """
    rules: list[Rule] = []
    for name in sorted(names):
        if name in _SUPPLEMENT:
            for spec in _SUPPLEMENT[name]:
                pattern = spec["pattern"]
                if not isinstance(pattern, str):
                    raise PolicyError("guard rule table is malformed")
                rules.append(_options(name, re.compile(pattern), spec))
            continue
        module_name, class_name, per_pattern = _DETECT_SECRETS[name]
        try:
            module = importlib.import_module(f"detect_secrets.plugins.{module_name}")
            denylist = list(getattr(module, class_name)().denylist)
        except (ImportError, AttributeError, TypeError) as exc:
            raise PolicyError(
                "the guard's secret-pattern rules need the detect-secrets package"
            ) from exc
        if len(denylist) != len(per_pattern):
            # Upstream changed the rule; the gates below would no longer be proven supersets.
            raise PolicyError(
                f"detect-secrets rule {name!r} changed shape; update moat.guard.rules"
            )
        for index, pattern in enumerate(denylist):
            opts = dict(per_pattern[index])
            if name == "private_key":
                opts["gate"] = _PRIVATE_KEY_GATE
            rules.append(_options(name, pattern, opts))
    return tuple(rules)
