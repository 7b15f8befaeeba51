"""Safe, exact evaluation of arithmetic written by a model.

Both the Countdown reward (is this equation equal to the target, and which numbers does it
use?) and the math-accuracy fast path (is ``\\frac{566}{2}`` the same number as ``283``?) need
to evaluate arithmetic that a policy wrote, i.e. adversarial text. ``eval`` is out of the
question (``__import__('os').system(...)``), and so is Python's own big-integer arithmetic
without limits (``9**9**9`` would run for hours and cannot be interrupted by a signal).

This module is a small recursive-descent parser that evaluates as it parses, in exact
rational arithmetic (``fractions.Fraction``):

    expr  := term  (('+' | '-') term)*
    term  := unary (('*' | '/') unary)*
    unary := ('+' | '-') unary | power          (unary signs only with allow_unary)
    power := atom ('^' unary)?                  (right-associative; '**' means '^')
    atom  := NUMBER | '(' expr ')' | '{' expr '}' | '\\frac' '{' expr '}' '{' expr '}'

LaTeX spellings (``\\times \\cdot \\div \\left( \\right)`` and spacing commands) are accepted with
``allow_latex``, and the Unicode signs ``× · ⋅ ÷ −`` always. Anything else, including
non-ASCII digits and letters, is a syntax error.
Every resource is bounded by :class:`ArithConfig`: input length, token count, nesting depth,
digits per literal, and the bit length of every intermediate numerator and denominator
(a power is refused BEFORE it is computed when its result would be too large).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction


#: Unicode operator signs and the ASCII operator each means
_UNICODE_OPS = {"\u00d7": "*", "\u00b7": "*", "\u22c5": "*", "\u00f7": "/", "\u2212": "-"}


class ArithError(ValueError):
    """The text is not an acceptable arithmetic expression."""


class ArithSyntaxError(ArithError):
    """Not arithmetic in the accepted grammar (letters, unknown commands, unbalanced parens)."""


class ArithRangeError(ArithError):
    """Arithmetic, but beyond a configured bound (too long, too deep, too large a number)."""


class ArithDomainError(ArithError):
    """Arithmetic with no rational value: division by zero, a non-integer exponent."""


@dataclass(frozen=True)
class ArithConfig:
    """What the evaluator accepts and the bounds that keep it cheap."""

    allow_power: bool = True
    """Accept ``^`` and ``**`` (integer exponents only)."""
    allow_decimals: bool = True
    """Accept decimal literals such as ``0.5`` (exact: 0.5 is 1/2)."""
    allow_unary: bool = True
    """Accept leading ``-``/``+`` signs (``-3``, ``2^-1``)."""
    allow_latex: bool = True
    """Accept ``{}`` groups, ``\\frac``, ``\\times``, ``\\cdot``, ``\\div``, ``\\left``/``\\right``."""
    allow_thousands: bool = True
    """Read ``1,000`` as one thousand (a comma followed by exactly three digits)."""
    max_chars: int = 512
    """Longer input is refused without being read."""
    max_tokens: int = 256
    """Most tokens in one expression."""
    max_depth: int = 32
    """Deepest nesting of parentheses, braces, signs and powers."""
    max_literal_digits: int = 64
    """Most digits in one number literal."""
    max_bits: int = 4096
    """Largest bit length of any intermediate numerator or denominator (~1233 decimal digits)."""


@dataclass(frozen=True)
class ArithResult:
    """The exact value and the number literals in the order written (Countdown checks them)."""

    value: Fraction
    literals: tuple[Fraction, ...] = field(default_factory=tuple)


_LATEX_OPS = {"times": "*", "cdot": "*", "div": "/"}
_LATEX_FRAC = ("frac", "dfrac", "tfrac")
_LATEX_SKIP = ("left", "right")
_SPACING = ",!;: "


def _tokenize(text: str, cfg: ArithConfig) -> list[tuple[str, object]]:
    """Tokens as (kind, value): ('num', Fraction) or ('op', one of + - * / ^ ( ) { } frac)."""
    if len(text) > cfg.max_chars:
        raise ArithRangeError(f"expression longer than {cfg.max_chars} characters")
    toks: list[tuple[str, object]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n":
            i += 1
            continue
        if "0" <= c <= "9" or (c == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            digits = text[i:j]
            while cfg.allow_thousands and j > i:
                # 1,000,000 (or LaTeX 1\,000): a separator then exactly three digits
                sep = 1 if text.startswith(",", j) else 2 if cfg.allow_latex and text.startswith("\\,", j) else 0
                group = text[j + sep:j + sep + 3]
                if not sep or len(group) != 3 or not all("0" <= d <= "9" for d in group) \
                        or (j + sep + 3 < n and "0" <= text[j + sep + 3] <= "9"):
                    break
                digits += group
                j += sep + 3
            frac_digits = ""
            if j < n and text[j] == ".":
                if not cfg.allow_decimals:
                    raise ArithSyntaxError(f"decimal point at position {j} is not allowed")
                k = j + 1
                while k < n and "0" <= text[k] <= "9":
                    k += 1
                frac_digits, j = text[j + 1:k], k
            if len(digits) + len(frac_digits) > cfg.max_literal_digits:
                raise ArithRangeError(f"number literal longer than {cfg.max_literal_digits} digits")
            value = Fraction(int(digits or "0"))
            if frac_digits:
                value += Fraction(int(frac_digits), 10 ** len(frac_digits))
            toks.append(("num", value))
            i = j
        elif c in "+-/()^":
            toks.append(("op", c))
            i += 1
        elif c in _UNICODE_OPS:  # what models write for times, divided by, minus
            toks.append(("op", _UNICODE_OPS[c]))
            i += 1
        elif c == "*":
            if i + 1 < n and text[i + 1] == "*":
                toks.append(("op", "^"))
                i += 2
            else:
                toks.append(("op", "*"))
                i += 1
        elif c in "{}" and cfg.allow_latex:
            toks.append(("op", c))
            i += 1
        elif c == "\\" and cfg.allow_latex:
            j = i + 1
            while j < n and "a" <= text[j].lower() <= "z":
                j += 1
            name = text[i + 1:j]
            if not name:
                if j < n and text[j] in _SPACING:
                    i = j + 1
                    continue
                raise ArithSyntaxError(f"unknown LaTeX escape at position {i}")
            if name in _LATEX_OPS:
                toks.append(("op", _LATEX_OPS[name]))
            elif name in _LATEX_FRAC:
                toks.append(("op", "frac"))
                # LaTeX's shorthand \frac13 = \frac{1}{3}: one digit per unbraced argument
                while j < n and text[j] == " ":
                    j += 1
                for _ in range(2):
                    if j < n and "0" <= text[j] <= "9":
                        toks += [("op", "{"), ("num", Fraction(int(text[j]))), ("op", "}")]
                        j += 1
                    else:
                        break
            elif name not in _LATEX_SKIP:
                raise ArithSyntaxError(f"unsupported LaTeX command \\{name}")
            i = j
        else:
            raise ArithSyntaxError(f"unexpected character {c!r} at position {i}")
        if len(toks) > cfg.max_tokens:
            raise ArithRangeError(f"expression has more than {cfg.max_tokens} tokens")
    if not toks:
        raise ArithSyntaxError("empty expression")
    return toks


class _Parser:
    def __init__(self, toks: list[tuple[str, object]], cfg: ArithConfig):
        self.toks, self.cfg, self.pos, self.depth = toks, cfg, 0, 0
        self.literals: list[Fraction] = []

    def peek(self) -> object:
        return self.toks[self.pos][1] if self.pos < len(self.toks) and self.toks[self.pos][0] == "op" else None

    def expect(self, op: str) -> None:
        if self.peek() != op:
            raise ArithSyntaxError(f"expected {op!r} at token {self.pos}")
        self.pos += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > self.cfg.max_depth:
            raise ArithRangeError(f"expression nested deeper than {self.cfg.max_depth}")

    def bound(self, v: Fraction) -> Fraction:
        lim = self.cfg.max_bits
        if abs(v.numerator).bit_length() > lim or v.denominator.bit_length() > lim:
            raise ArithRangeError(f"intermediate value exceeds {lim} bits")
        return v

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.peek()
            self.pos += 1
            rhs = self.term()
            v = self.bound(v + rhs if op == "+" else v - rhs)
        return v

    def term(self) -> Fraction:
        v = self.unary()
        while self.peek() in ("*", "/"):
            op = self.peek()
            self.pos += 1
            rhs = self.unary()
            if op == "*":
                v = self.bound(v * rhs)
            elif rhs == 0:
                raise ArithDomainError("division by zero")
            else:
                v = self.bound(v / rhs)
        return v

    def unary(self) -> Fraction:
        op = self.peek()
        if op in ("+", "-"):
            if not self.cfg.allow_unary:
                raise ArithSyntaxError(f"unary {op!r} at token {self.pos} is not allowed")
            self.pos += 1
            self.enter()
            v = self.unary()
            self.depth -= 1
            return -v if op == "-" else v
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "^":
            return base
        if not self.cfg.allow_power:
            raise ArithSyntaxError("powers are not allowed")
        self.pos += 1
        self.enter()
        exp = self.unary()
        self.depth -= 1
        if exp.denominator != 1:
            raise ArithDomainError("non-integer exponent has no rational value")
        e = exp.numerator
        if base == 0 and e < 0:
            raise ArithDomainError("division by zero (0 to a negative power)")
        if base in (0, 1) or e == 0:
            return Fraction(1) if e == 0 else base
        if base == -1:
            return Fraction(-1 if e % 2 else 1)
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
        # |base| >= 2 (or its inverse) has at least bits-1 bits of growth per factor: refuse
        # before Python starts a power it could not finish.
        if (bits - 1) * abs(e) > self.cfg.max_bits:
            raise ArithRangeError(f"power exceeds {self.cfg.max_bits} bits")
        return self.bound(base ** e)

    def atom(self) -> Fraction:
        if self.pos >= len(self.toks):
            raise ArithSyntaxError("expression ends where a number was expected")
        kind, val = self.toks[self.pos]
        if kind == "num":
            self.pos += 1
            self.literals.append(val)  # type: ignore[arg-type]
            return val  # type: ignore[return-value]
        if val in ("(", "{"):
            close = ")" if val == "(" else "}"
            self.pos += 1
            self.enter()
            v = self.expr()
            self.depth -= 1
            self.expect(close)
            return v
        if val == "frac":
            self.pos += 1
            num = self.atom_group()
            den = self.atom_group()
            if den == 0:
                raise ArithDomainError("division by zero in \\frac")
            return self.bound(num / den)
        raise ArithSyntaxError(f"unexpected {val!r} at token {self.pos}")

    def atom_group(self) -> Fraction:
        if self.peek() != "{":
            raise ArithSyntaxError(f"\\frac needs braced arguments (token {self.pos})")
        return self.atom()


def evaluate(text: str, config: ArithConfig | None = None) -> ArithResult:
    """Exact value of ``text`` and its literals; raises an :class:`ArithError` subclass."""
    cfg = config or ArithConfig()
    if not isinstance(text, str):
        raise ArithSyntaxError(f"expression must be a str, got {type(text).__name__}")
    parser = _Parser(_tokenize(text, cfg), cfg)
    value = parser.expr()
    if parser.pos != len(parser.toks):
        raise ArithSyntaxError(f"unexpected trailing input at token {parser.pos}")
    return ArithResult(value=value, literals=tuple(parser.literals))
