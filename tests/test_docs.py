"""The sources read like a textbook, and README.md keeps its promises.

The C sources (every *.c and *.h at the top of the repository except the generated
tokenizer_unicode.h) follow the rules a reader needs: lines of at most 100 characters, one
statement per line, no statements joined by the comma operator, min/max helpers instead of
hand-written ternaries, and no function longer than 80 lines. Every source and README cite only
documents that are in the repository. Every option of `./run --help` and every mode is
documented in README's tables.
"""
import glob
import os
import re

from conftest import ROOT, run


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


# The engine's C sources: every top-level *.c / *.h, less the generated Unicode tables.
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.[ch]"))
                 if os.path.basename(p) != "tokenizer_unicode.h")

MAX_LINE = 100
MAX_FUNCTION = 80


def test_lines_fit_a_reader():
    """No line of the C sources or of export.py is longer than 100 characters."""
    long_lines = []
    for name in SOURCES + ["export.py"]:
        lines = enumerate(read(name).split("\n"), 1)
        long_lines += [f"{name}:{n}" for n, line in lines if len(line) > MAX_LINE]
    print(f"\n[docs] {len(long_lines)} lines over {MAX_LINE} characters in "
          f"{', '.join(SOURCES)}, export.py")
    assert not long_lines, long_lines[:20]


# ----------------------------------------------------------------------------
# Citations

# Everything a reader reads: sources, tests, fuzz harnesses, tools, README, Makefile.
CITING = ["*.c", "*.h", "*.py", "*.md", "Makefile", "tests/*.py", "tests/*.c",
          "tests/fuzz/*.c", "tests/fuzz/*.h", "tests/fuzz/*.py", "tools/*.py"]

# A published source a section sign may follow: a paper ("Xiao et al. 2023"), an arXiv id,
# an RFC, the Unicode Standard or one of its annexes (UAX, UTS), an ISO/IEC or IEEE standard,
# the C standard (C99, C11, ...) or POSIX.
PUBLISHED = re.compile(r"et al\.|arXiv|\bRFC ?\d+|Unicode|\bUAX\b|\bUTS\b|\bISO\b|\bIEEE\b"
                       r"|\bC(?:89|99|11|17|23)\b|POSIX")
SECTION = "\u00a7"   # the section sign, spelled so that this file passes its own test
MD_NAME = re.compile(r"[\w./-]*\w\.md\b")


def section_is_cited(line, at):
    """The section sign at line[at] follows a published source named at most 40 characters
    earlier on the same line, with no Markdown file named in between."""
    before = line[max(0, at - 40):at]
    names = list(PUBLISHED.finditer(before))
    return bool(names) and not MD_NAME.search(before[names[-1].end():])


def missing_markdown(line, folder):
    """The Markdown files the line names that are neither in the repository's root nor in
    folder (inside the repository). A name within a URL is not the repository's."""
    missing = []
    for m in MD_NAME.finditer(line):
        word = re.search(r"\S*$", line[:m.start()]).group(0) + m.group(0)
        here = [os.path.join(base, m.group(0)) for base in (ROOT, folder)]
        inside = [p for p in here if os.path.realpath(p).startswith(ROOT + os.sep)]
        if "://" not in word and not any(os.path.isfile(p) for p in inside):
            missing.append(m.group(0))
    return missing


def test_no_citation_of_missing_documents():
    """Sources cite only what a reader can open.

    - A Markdown file named in a source must be a file of the repository, relative to the
      root or to the citing file (a URL, with "://", points elsewhere and is left alone).
    - A section sign must follow, on the same line and at most 40 characters after it, the
      name of a published source: a paper ("Xiao et al. 2023 <sign>3.2"), arXiv, an RFC, the
      Unicode Standard or its annexes (UAX/UTS), ISO/IEEE, the C standard, POSIX. A bare
      "<sign>4", "spec <sign>2.2" or a section of a design note outside the repository fails:
      the reader has nothing to open. Cite the paper or the upstream function instead.
    """
    names = sorted({p for pattern in CITING for p in glob.glob(os.path.join(ROOT, pattern))
                    if os.path.basename(p) != "tokenizer_unicode.h"})
    bad = []
    for path in names:
        rel = os.path.relpath(path, ROOT)
        for n, line in enumerate(read(rel).split("\n"), 1):
            bad += [f"{rel}:{n}: {name} is not in the repository"
                    for name in missing_markdown(line, os.path.dirname(path))]
            for m in re.finditer(SECTION, line):
                if not section_is_cited(line, m.start()):
                    bad.append(f"{rel}:{n}: section sign without a published source: "
                               f"{line.strip()[:80]}")
    print(f"\n[docs] {len(names)} files checked, {len(bad)} citations of missing documents")
    assert not bad, "\n".join(bad)


def test_section_rule_tells_papers_from_missing_documents():
    """The rule above, on the citations it is meant to pass and to catch."""
    def ok(text):
        return all(section_is_cited(text, m.start()) for m in re.finditer(SECTION, text))
    assert ok(f"attention sinks (Xiao et al. 2023 {SECTION}3.2)")
    assert ok(f"Hangul composition (The Unicode Standard, {SECTION}3.12)")
    assert ok(f"arXiv:2309.00071 {SECTION}3.2, {SECTION}3.3")
    assert not ok(f"following transformers' standardize_rope_params (spec {SECTION}2.2)")
    assert not ok(f"where the dummy prefix goes ({SECTION}14.1)")
    note = "NOTES" + ".md"   # a Markdown file that is not in the repository
    tests = os.path.join(ROOT, "tests")
    assert missing_markdown(f"see README{'.md'} and ../README{'.md'}", tests) == []
    assert missing_markdown(f"https://github.com/karpathy/llama2.c/blob/master/{note}", ROOT) == []
    assert missing_markdown(f"the rules in ../shared/{note} and {note}", tests) == [
        f"../shared/{note}", note]
    assert not ok(f"Xiao et al. 2023, as in {note} {SECTION}3")
    assert not ok(f"a layer's frequencies, after Chen et al. 2023 (written out at length in the "
                  f"design note {SECTION}3)")


# ----------------------------------------------------------------------------
# A small C lexer for the rules below. It knows just enough C for these sources: it blanks
# comments, the insides of string and character literals and preprocessor lines (keeping every
# newline, so line numbers stay), then splits what is left into tokens.

TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|->|\+\+|--|<<=|>>=|<<|>>|&&|\|\||[-+*/%&|^<>=!]=|\S")
CONTROL = {"if", "while", "for", "switch"}
# Words that begin a statement which is not a declaration.
STATEMENT_WORDS = CONTROL | {"return", "goto", "break", "continue", "case", "default", "else",
                             "do", "sizeof"}


def code_only(text):
    """text with comments, literal contents and preprocessor lines turned into spaces."""
    out = []
    i, n = 0, len(text)
    line_start = True   # only whitespace so far on this line: a '#' starts a directive
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2) + 2
        elif c == "#" and line_start:
            j = i
            while j < n and (text[j] != "\n" or text[j - 1] == "\\"):
                j += 1
        elif c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + re.sub(r"[^\n]", " ", text[i + 1:j]) + c)
            i = j + 1
            line_start = False
            continue
        else:
            out.append(c)
            line_start = c == "\n" or (line_start and c in " \t")
            i += 1
            continue
        out.append(re.sub(r"[^\n]", " ", text[i:j]))   # a comment or a directive
        i = j
    return "".join(out)


def tokens(text):
    """(line number, token) for each token of the C text."""
    code = code_only(text)
    starts = [m.start() for m in re.finditer("\n", code)]
    result = []
    line, k = 1, 0
    for m in TOKEN.finditer(code):
        while k < len(starts) and starts[k] < m.start():
            k += 1
            line += 1
        result.append((line, m.group(0)))
    return result


def functions(text):
    """(name, first line, last line) of each function definition, from the first line of its
    signature to its closing brace."""
    toks = tokens(text)
    found = []
    depth = 0
    start = 0        # the first token after the last top-level ';' or '}'
    body = False     # the open top-level brace is a function body: it follows a ')'
    for i, (line, tok) in enumerate(toks):
        if tok == "{":
            if depth == 0:
                body = i > 0 and toks[i - 1][1] == ")"
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0 and body:
                signature = [t for _, t in toks[start:i]]
                name = signature[signature.index("(") - 1]
                found.append((name, toks[start][0], line))
            if depth == 0:
                start = i + 1
        elif tok == ";" and depth == 0:
            start = i + 1
    return found


def test_functions_fit_a_reader():
    """No function of the C sources is longer than 80 lines, signature and braces included:
    a longer one is split into named steps."""
    longest, long_ones = ("", "", 0), []
    for name in SOURCES:
        for fn, first, last in functions(read(name)):
            length = last - first + 1
            longest = max(longest, (name, fn, length), key=lambda x: x[2])
            if length > MAX_FUNCTION:
                long_ones.append(f"{name}:{first}: {fn}() is {length} lines")
    print(f"\n[docs] longest function: {longest[1]}() in {longest[0]}, {longest[2]} lines; "
          f"{len(long_ones)} over {MAX_FUNCTION}")
    assert not long_ones, "\n".join(long_ones)


def statement_problems(text):
    """Lines that hold more than one statement, and lines where the comma operator joins
    statements, as two lists of (line number, reason).

    The walk keeps a stack of open brackets. A '{' opens a block (a function body, or after a
    control header, else, do, ';', '{', '}' or a label), an aggregate (struct/union body) or an
    initializer (after '=' or ',', a compound literal after a cast, an enum body, and every
    brace inside an initializer). A statement starts after ';', after a block's '{' or '}',
    after the ')' of an if/while/for/switch header, after else/do and after a label's ':'.
    """
    toks = tokens(text)
    crowded, joined = [], []
    stack = []            # open brackets: ("(", kind) with kind "for", "control" or "call",
    #                       ("[", None), ("{", kind) with kind "block", "aggregate" or "init"
    start = 0             # the first token of the current statement
    closed = None         # the kind of the last ')' seen

    def inner_brace():
        return next((kind for b, kind in reversed(stack) if b == "{"), "top")

    def at_statement_level():   # no '(' or '[' open inside the innermost brace
        return not stack or stack[-1][0] == "{"

    def in_for_header():
        for b, kind in reversed(stack):
            if b == "{":
                return False
            if kind == "for":
                return True
        return False

    for i, (line, tok) in enumerate(toks):
        prev = toks[i - 1][1] if i else ";"
        if tok == "(":
            stack.append(("(", "for" if prev == "for" else "control" if prev in CONTROL
                          else "call"))
        elif tok == "[":
            stack.append(("[", None))
        elif tok in ")]":
            closed = stack.pop()[1]
            if tok == ")" and closed in ("for", "control") and at_statement_level():
                start = i + 1
        elif tok == "{":
            before = toks[i - 2][1] if i > 1 else ""
            if inner_brace() == "init" or prev in ("=", ","):
                kind = "init"
            elif "enum" in (prev, before):
                kind = "init"
            elif "struct" in (prev, before) or "union" in (prev, before):
                kind = "aggregate"
            elif prev == ")" and closed == "call" and inner_brace() != "top":
                kind = "init"        # a compound literal: (Type){...}
            else:
                kind = "block"
            stack.append(("{", kind))
            if kind != "init":
                start = i + 1
        elif tok == "}":
            kind = stack.pop()[1]
            if kind != "init":
                start = i + 1
        elif tok == ";" and not in_for_header():
            k = i + 1        # after a ';' only closing braces may follow on its line
            while k < len(toks) and toks[k][0] == line and toks[k][1] in ("}", ";"):
                k += 1
            if k < len(toks) and toks[k][0] == line:
                crowded.append((line, "two statements"))
            start = i + 1
        elif tok in ("else", "do") and at_statement_level():
            start = i + 1
        elif tok == ":" and at_statement_level() and (
                toks[start][1] in ("case", "default") or i == start + 1):
            start = i + 1        # after a label
        elif tok == "," and at_statement_level() and inner_brace() == "block":
            first = toks[start][1]
            k = start + 1
            while k < i and toks[k][1] == "*":
                k += 1
            declaration = (re.match(r"[A-Za-z_]", first) and first not in STATEMENT_WORDS
                           and re.match(r"[A-Za-z_]", toks[k][1]))
            if not declaration:
                joined.append((line, "comma operator"))
    return crowded, joined


def test_one_statement_per_line():
    """In the C sources no line holds two statements (a ';' followed by more than closing
    braces, outside a for header) and no statement joins expressions with the comma operator
    (a comma outside brackets in a statement that is not a declaration; the commas of a for
    header, of calls and of initializers are not statements' commas)."""
    report, bad = [], []
    for name in SOURCES:
        crowded, joined = statement_problems(read(name))
        report.append(f"{name}: {len(set(crowded))} lines with two statements, "
                      f"{len(set(joined))} with the comma operator")
        lines = read(name).split("\n")
        found = sorted(set(crowded + joined))
        bad += [f"{name}:{n}: {why}: {lines[n - 1].strip()}" for n, why in found]
    print("\n[docs] " + "; ".join(report))
    assert not bad, "\n".join(bad)


def test_statement_rules_catch_what_they_should():
    """The lexer on small cases: what passes and what must fail."""
    def problems(body):
        crowded, joined = statement_problems("void f(void) {\n" + body + "\n}\n")
        return len(crowded), len(joined)
    assert problems("for (int i = 0, j = 1; i < n; i++, j--) x[i] = j;") == (0, 0)
    assert problems("int a = 1, b = f(a, 2), *c = &a;") == (0, 0)
    assert problems('puts("a; b, c"); // d; e, f') == (0, 0)
    assert problems("Cand c = (Cand){ 1, 2 };\nint v[2] = { 3, 4 };") == (0, 0)
    assert problems("switch (x) {\ncase 1: return g(a, b);\ndefault: break;\n}") == (0, 0)
    assert problems("a = 1; b = 2;") == (1, 0)
    assert problems("if (x) { y = 1; return; }") == (1, 0)
    assert problems("a = 1, b = 2;") == (0, 1)
    assert problems("if (x) free(p), p = NULL;") == (0, 1)
    assert problems("for (;;) i++, j++;") == (0, 1)
    assert problems("else *p = q, *cap = c;") == (0, 1)


# A hand-written minimum or maximum: a < b ? a : b, a >= b ? b : a, ... with the same two
# operands (names, members, subscripts, numbers) on both sides of the '?'.
OPERAND = r"[A-Za-z_]\w*(?:(?:->|\.)\w+|\[[^\[\]]*\])*|\d\w*"
TERNARY = re.compile(rf"(?<![\w.>])({OPERAND})\s*[<>]=?\s*({OPERAND})\s*\?\s*({OPERAND})"
                     rf"\s*:\s*({OPERAND})(?![\w\[.(])")


def min_max_ternaries(text):
    """(line number, text) of each hand-written min/max outside the helpers themselves (functions
    named min_*, *_max, ...). An operand must stand alone: the condition must not continue an
    arithmetic expression on its left, and the last operand must not be followed by one."""
    code = code_only(text)
    helpers = [(first, last) for name, first, last in functions(text)
               if re.search(r"(^|_)(min|max)(_|$)", name)]
    found = []
    for m in TERNARY.finditer(code):
        left = code[:m.start()].rstrip()[-1:]
        right = code[m.end():].lstrip()[:1]
        if left and left in "+-*/%&|^!~<>" or right and right not in ");,}]:":
            continue
        a, b, x, y = m.groups()
        line = code.count("\n", 0, m.start()) + 1
        if a != b and {a, b} == {x, y} and not any(f <= line <= l for f, l in helpers):
            found.append((line, m.group(0)))
    return found


def test_min_max_helpers():
    """min/max are spelled with helpers (min_size, max_int, ...), not as ternaries."""
    assert min_max_ternaries("n = a < b ? a : b;\nm = k >= x->n ? x->n : k;") == [
        (1, "a < b ? a : b"), (2, "k >= x->n ? x->n : k")]
    assert min_max_ternaries("n = k - i > d ? i + d : k;\nm = a < b ? a : b + 1;") == []
    assert min_max_ternaries("static int min_int(int a, int b) { return a < b ? a : b; }") == []
    bad = []
    for name in SOURCES:
        lines = read(name).split("\n")
        found = sorted({n for n, _ in min_max_ternaries(read(name))})
        bad += [f"{name}:{n}: {lines[n - 1].strip()}" for n in found]
    print(f"\n[docs] {len(bad)} hand-written min/max in {', '.join(SOURCES)}")
    assert not bad, "\n".join(bad)


def test_every_option_and_mode_is_documented():
    help_text = run("-h").stdout   # `run -h` prints usage to stdout and exits 0
    options = sorted(set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", help_text)))
    documented = set(re.findall(r"`(--?[a-z][\w-]*)", readme()))
    missing = [o for o in options if o not in documented]
    assert not missing, f"options in --help but not in README.md: {missing}"
    modes = re.search(r"-m MODE\s+(.*?)\(default", help_text).group(1)
    for mode in re.findall(r"[a-z]+", modes):
        assert f"`{mode}`" in readme(), f"mode {mode} is not documented in README.md"
    print(f"\n[docs] {len(options)} options and every mode documented")


def test_every_function_the_readme_names_exists():
    """README's walkthrough names functions as `name()`; each must be defined in a source (the
    C files, export.py, tools/): a renamed or deleted function cannot leave the text behind."""
    sources = [os.path.join(ROOT, n) for n in SOURCES + ["export.py"]]
    sources += glob.glob(os.path.join(ROOT, "tools", "*.[ch]"))
    sources += glob.glob(os.path.join(ROOT, "tools", "*.py"))
    text = "\n".join(open(p, encoding="utf-8").read() for p in sources)
    named = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\(\)`", readme()))
    assert len(named) > 50, sorted(named)
    missing = sorted(n for n in named
                     if not re.search(rf"(\b{n}\s*\(|def {n}\b|#define {n}\()", text))
    assert not missing, f"README names functions no source defines: {missing}"
