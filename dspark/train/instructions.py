"""Instructions for self-generated drafter data, built offline (answered by dspark/train/selfgen.py).

A drafter learns to predict the *target's* continuations, so the best data is the target's own
responses (issue 5). The evaluation prompts in ../shared/datasets/ are off limits, so instructions
are built here from text that ships with Python, in the three evaluation styles:

- code: public functions/methods of pure-Python stdlib modules (inspect: signature, docstring,
  source) turned into "write / complete / explain / document / test this" requests;
- math: arithmetic and word problems generated from templates with random numbers and names;
- chat: paragraphs of the Python reference (pydoc_data.topics) and module docstrings to summarise
  or explain, concepts to explain to a beginner, and open writing/advice/role-play requests
  assembled from small word lists.

Everything is deterministic given the seed, and every instruction is checked against the eval
prompts (equal, contains one, or is contained in one) and dropped if it matches.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import pathlib
import random
import re
import sys
import textwrap
import warnings

EVAL_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "datasets"

# Pure-Python stdlib (and a few installed) modules whose functions carry useful docstrings and
# readable source. A fixed list keeps the build deterministic and avoids importing modules with
# side effects (antigravity, this, turtle, idlelib...).
CODE_MODULES = (
    "abc argparse ast base64 bisect calendar cmd codecs collections colorsys configparser contextlib copy "
    "csv dataclasses datetime decimal difflib dis email.utils enum filecmp fileinput fnmatch fractions "
    "ftplib functools getopt gettext glob gzip heapq hmac html html.parser http.client http.cookies "
    "imaplib inspect ipaddress json json.decoder json.encoder keyword linecache locale logging "
    "logging.handlers mailbox mimetypes netrc ntpath numbers operator optparse os pathlib pickle pkgutil "
    "platform plistlib posixpath pprint queue quopri random re reprlib sched secrets selectors shlex "
    "shutil smtplib socketserver statistics string stringprep tarfile tempfile textwrap threading timeit "
    "tokenize trace traceback types typing urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zipimport packaging.version packaging.specifiers "
    "jinja2.utils tqdm.std"
).split()


# -- evaluation-set guard -------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load_eval_prompts(eval_dir: pathlib.Path = EVAL_DIR) -> list[str]:
    """Every turn of every eval prompt (humaneval, gsm8k, mt-bench). Missing sets are an error, not
    an empty list: the overlap filter must never pass for want of something to compare with."""
    paths = sorted(pathlib.Path(eval_dir).glob("*.jsonl"))
    if not paths:
        raise FileNotFoundError(f"no evaluation sets (*.jsonl) under {eval_dir}; the instruction builder needs them "
                                f"to keep evaluation prompts out of the training data")
    prompts = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.extend(json.loads(line)["turns"])
    return prompts


def overlaps_eval(prompts: list[str], eval_prompts: list[str], min_inner: int = 40) -> set[int]:
    """Indices of prompts that equal an eval prompt, contain one, or (when at least min_inner
    characters long) are contained in one, after lowercasing and collapsing whitespace. Joined
    haystacks make it two linear passes instead of a quadratic loop."""
    ours = [_norm(p) for p in prompts]
    theirs = [_norm(e) for e in eval_prompts if e.strip()]
    sep = "\x00"
    our_hay, eval_hay = sep.join(ours), sep.join(theirs)
    starts, pos = [], 0
    for o in ours:
        starts.append(pos)
        pos += len(o) + 1
    bad = set()
    for e in theirs:
        at = our_hay.find(e)
        while at >= 0:
            bad.add(bisect.bisect_right(starts, at) - 1)
            at = our_hay.find(e, at + 1)
    for i, o in enumerate(ours):
        if o in theirs or (len(o) >= min_inner and o in eval_hay):
            bad.add(i)
    return bad


def _pick(styles: dict[str, str], rng: random.Random) -> tuple[str, str]:
    """(style, prompt) of a style drawn in name order, so the draw does not depend on dict order."""
    style = rng.choice(sorted(styles))
    return style, styles[style]


# -- code instructions ----------------------------------------------------------------------------
def _summary(doc: str) -> str:
    """First paragraph of a docstring, on one line."""
    first = doc.strip().split("\n\n")[0]
    return " ".join(first.split())


def _strip_docstring(source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    fn = tree.body[0]
    if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None), ast.Constant):
        fn.body = fn.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def collect_functions(modules=CODE_MODULES, max_lines: int = 40) -> list[dict]:
    """Public functions and methods with a docstring and short pure-Python source, sorted by name
    so the result does not depend on dict or import order."""
    found = {}
    for name in modules:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # an optional package missing here just means fewer functions
            continue
        for qual, obj in _public_callables(module):
            doc = inspect.getdoc(obj)
            if not doc or len(_summary(doc)) < 20:
                continue
            try:
                source = textwrap.dedent(inspect.getsource(obj))
                signature = str(inspect.signature(obj))
            except (OSError, TypeError, ValueError):
                continue
            if source.count("\n") > max_lines or not source.lstrip().startswith(("def ", "async def ")):
                continue
            found[f"{name}.{qual}"] = {"qualname": f"{name}.{qual}", "name": obj.__name__, "signature": signature,
                                       "doc": doc, "summary": _summary(doc), "source": source.rstrip()}
    return [found[k] for k in sorted(found)]


def _public_callables(module):
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield attr, obj
        elif inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isfunction(meth):
                    yield f"{attr}.{meth_name}", meth


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def code_instruction(fn: dict, rng: random.Random) -> tuple[str, str]:
    """One of several request styles for a function; returns (style, prompt)."""
    stub = f"def {fn['name']}{fn['signature']}:\n" + textwrap.indent(f'"""{fn["doc"]}\n"""', "    ")
    summary, src = fn["summary"].rstrip("."), fn["source"]
    styles = {
        "write": f"Write a Python function `{fn['name']}{fn['signature']}` that does the following: {summary}.",
        "complete": f"Complete the following Python function so that it does what its docstring says:\n"
                    f"```python\n{stub}\n```",
        "implement": f"Implement this in Python, with type hints and a short usage example: {_lower_first(summary)}.",
        "explain": f"Explain what this code does:\n```python\n{src}\n```",
        "docstring": f"Write a docstring for the following function:\n```python\n{_strip_docstring(src)}\n```",
        "test": f"Write pytest unit tests for `{fn['qualname']}`. It is documented as: {summary}.",
        "usage": f"How do I use `{fn['qualname']}` in Python? Show a short example.",
        "refactor": f"Rewrite this function to be more readable and add type hints:\n```python\n{src}\n```",
        "review": f"Review this Python code. Point out possible bugs or edge cases:\n```python\n{src}\n```",
    }
    if styles["docstring"].endswith("None\n```"):
        del styles["docstring"]
    return _pick(styles, rng)


# -- math instructions ----------------------------------------------------------------------------
NAMES = "Ava Ben Carla Dev Elena Farid Grace Hiro Ines Jamal Kofi Lena Mateo Nadia Omar Priya Quinn Rosa Sam Tara".split()
ITEMS = "apples notebooks pencils cupcakes stickers books tickets oranges candles plants shirts marbles".split()
SUFFIXES = ("\nPlease reason step by step, and put your final answer within \\boxed{}.", " Show your work.",
            " Explain your reasoning.", "")


def _math_templates(r: random.Random) -> dict[str, str]:
    """Word problems and drills with fresh numbers; each value is a question."""
    a, b, c, d = (r.randint(2, 60) for _ in range(4))
    n1, n2, item = r.choice(NAMES), r.choice(NAMES), r.choice(ITEMS)
    price, pct, hours = r.randint(2, 25), r.choice([10, 15, 20, 25, 30, 40, 50]), r.randint(2, 9)
    x = r.randint(-12, 12)
    return {
        "change": f"{n1} buys {a} {item} at ${price} each and pays with ${a * price + r.randint(1, 50)}. "
                  f"How much change does {n1} get?",
        "give_buy": f"{n1} has {a + b} {item}. {n1} gives {b} to {n2} and then buys {c} more. "
                    f"How many {item} does {n1} have now?",
        "discount": f"A jacket costs ${price * 10}. It is on sale for {pct}% off. What is the sale price?",
        "wage": f"{n1} earns ${price} per hour and works {hours} hours a day for {d % 6 + 2} days. "
                f"How much does {n1} earn in total?",
        "distance": f"A train travels at {a + 40} km/h for {hours} hours and then at {b + 30} km/h for "
                    f"{c % 4 + 1} hours. How far does it travel altogether?",
        "fraction": f"A class has {4 * a} students. One quarter of them walk to school, {c % 3 + 1} out of "
                    f"every 5 of the rest take the bus, and the others are driven. How many students are driven?",
        "average": f"{n1}'s test scores are {a + 40}, {b + 40}, {c + 40} and {d + 40}. What is the average score?",
        "ages": f"{n1} is {a} years old. {n2} is {b % 4 + 2} times as old as {n1} was {a // 2} years ago. "
                f"How old is {n2}?",
        "linear": f"Solve for x: {a}x + {b} = {a * x + b}.",
        "percent_of": f"What is {pct}% of {a * 20}?",
        "expression": f"Compute {a} * {b} - {c} + {d} * {hours}.",
        "gcd": f"What is the greatest common divisor of {a * 6} and {b * 4}?",
        "simplify": f"Simplify the fraction {a * c}/{b * c}.",
        "area": f"A rectangular garden is {a} m long and {b} m wide. A path 1 m wide runs around the outside. "
                f"What is the area of the path?",
        "time": f"A movie starts at {hours}:{c % 60:02d} pm and lasts {d + 60} minutes. When does it end?",
        "interest": f"{n1} puts ${a * 100} in a savings account with {c % 7 + 1}% simple interest per year. "
                    f"How much is in the account after {hours} years?",
        "recipe": f"A recipe for {b % 5 + 2} people uses {a * 50} grams of flour. How much flour is needed "
                  f"for {c % 9 + 3} people?",
        "split_bill": f"{hours + 1} friends share a bill of ${a * 7 + b}. They add a {pct // 2}% tip and split it "
                      f"evenly. How much does each pay?",
        "speed": f"{n1} runs {a % 10 + 3} km in {b + 20} minutes. What is {n1}'s average speed in km/h?",
        "sequence": f"What is the next number in the sequence {a}, {a + b}, {a + 2 * b}, {a + 3 * b}, ...? "
                    f"What is the 20th term?",
    }


def math_instruction(rng: random.Random) -> tuple[str, str]:
    style, prompt = _pick(_math_templates(rng), rng)
    return style, prompt + rng.choice(SUFFIXES)


# -- chat instructions ----------------------------------------------------------------------------
def doc_paragraphs(min_chars: int = 200, max_chars: int = 900) -> list[tuple[str, str]]:
    """(origin, paragraph) pairs of prose from the Python reference and stdlib module docstrings.
    Paragraphs that are mostly code or tables are skipped: the chat prompts should read like text."""
    from pydoc_data.topics import topics

    texts = [(f"pydoc-topics/{k}", topics[k]) for k in sorted(topics)]
    for name in CODE_MODULES:
        module = sys.modules.get(name)
        if module is not None and module.__doc__:
            texts.append((f"module-doc/{name}", module.__doc__))
    out = []
    for origin, text in texts:
        for para in re.split(r"\n\s*\n", text):
            flat = " ".join(para.split())
            letters = sum(ch.isalpha() or ch == " " for ch in flat)
            if min_chars <= len(flat) <= max_chars and letters >= 0.85 * len(flat) and flat[-1:] in ".:)":
                out.append((origin, flat))
    return out


CONCEPTS = ("list comprehensions", "generators", "decorators", "context managers", "exceptions", "recursion",
            "closures", "classes and objects", "inheritance", "dictionaries", "sets", "tuples", "lambda functions",
            "the global interpreter lock", "virtual environments", "type hints", "f-strings", "iterators",
            "regular expressions", "unit testing", "hash tables", "big-O notation", "binary search", "sorting",
            "floating point rounding", "Unicode and encodings", "threads and processes", "async and await",
            "garbage collection", "mutable and immutable values", "JSON", "HTTP requests", "file paths",
            "logging", "command-line arguments", "dataclasses", "pickling", "the call stack", "memoization")
FORMS = ("a short story", "a poem", "a blog post", "a formal email", "a product description", "a speech",
         "a limerick", "a diary entry", "a news headline and summary", "a persuasive essay outline")
SUBJECTS = ("a rainy day in the city", "learning to code", "a robot that learns to paint", "moving to a new country",
            "the first day at a new job", "saving energy at home", "a lighthouse keeper", "a lost umbrella",
            "teamwork", "a trip to the mountains", "a friendly dragon", "the importance of sleep",
            "a local farmers' market", "a library at night", "a bicycle repair shop", "space exploration")
GOALS = ("studying for exams", "staying focused while working from home", "learning a new language",
         "eating healthier on a budget", "preparing for a job interview", "running a first 5k",
         "keeping a small garden", "managing stress", "writing clearer emails", "saving money",
         "improving public speaking", "organising a small event", "getting better sleep")
ROLES = ("a museum tour guide", "a pirate captain", "a friendly librarian", "a detective", "a chef",
         "a personal trainer", "a medieval knight", "a tech support agent", "a travel agent", "a science teacher")


def open_chat_instruction(rng: random.Random) -> tuple[str, str]:
    concept, c2 = rng.sample(CONCEPTS, 2)
    styles = {
        "concept": f"Explain {concept} to a beginner.",
        "compare": f"What is the difference between {concept} and {c2}? Give an example of each.",
        "analogy": f"Give me an everyday analogy for {concept}.",
        "writing": f"Write {rng.choice(FORMS)} about {rng.choice(SUBJECTS)}.",
        "advice": f"Give me {rng.randint(3, 7)} practical tips for {rng.choice(GOALS)}.",
        "roleplay": f"Pretend you are {rng.choice(ROLES)}. Introduce yourself and describe a typical day.",
        "plan": f"Make a one-week plan for {rng.choice(GOALS)}.",
        "pros_cons": f"What are the pros and cons of {rng.choice(GOALS)} with a friend rather than alone?",
    }
    return _pick(styles, rng)


def doc_chat_instruction(para: str, rng: random.Random) -> tuple[str, str]:
    styles = {
        "summarise": f"Summarise this paragraph:\n\n{para}",
        "simplify": f"Explain the following in simple terms:\n\n{para}",
        "key_points": f"What are the key points of this text?\n\n{para}",
        "questions": f"Write three questions a student might ask after reading this, and answer them:\n\n{para}",
        "beginner": f"Rewrite this paragraph for someone new to programming:\n\n{para}",
    }
    return _pick(styles, rng)


# -- the instruction set --------------------------------------------------------------------------
def prompt_id(domain: str, prompt: str) -> str:
    """Stable id of an instruction; resuming matches on it."""
    return hashlib.sha1(f"{domain}\x00{prompt}".encode()).hexdigest()[:16]


def build_instructions(n_per_domain: int, seed: int = 0, eval_prompts: list[str] | None = None) -> list[dict]:
    """n_per_domain instructions for each of code, math and chat, interleaved (so a partial run
    still has a mix), deduplicated and with every eval-set overlap removed."""
    rng = random.Random(seed)
    fns = collect_functions()
    paras = doc_paragraphs()
    rng.shuffle(fns)
    rng.shuffle(paras)
    items = {"code": [], "math": [], "chat": []}
    for i in range(n_per_domain * 2):  # twice as many as asked: dedup and the eval filter drop some
        fn = fns[i % len(fns)]
        style, prompt = code_instruction(fn, rng)
        items["code"].append({"domain": "code", "source": f"stdlib-doc/{style}/{fn['qualname']}", "prompt": prompt})
        style, prompt = math_instruction(rng)
        items["math"].append({"domain": "math", "source": f"math-template/{style}", "prompt": prompt})
        if rng.random() < 0.5:
            origin, para = paras[i % len(paras)]
            style, prompt = doc_chat_instruction(para, rng)
            source = f"{origin}/{style}"
        else:
            style, prompt = open_chat_instruction(rng)
            source = f"chat-template/{style}"
        items["chat"].append({"domain": "chat", "source": source, "prompt": prompt})
    eval_prompts = load_eval_prompts() if eval_prompts is None else eval_prompts
    out = []
    for domain in items:
        kept, seen = [], set()
        bad = overlaps_eval([it["prompt"] for it in items[domain]], eval_prompts)
        for j, it in enumerate(items[domain]):
            it["id"] = prompt_id(domain, it["prompt"])
            if j not in bad and it["id"] not in seen:
                seen.add(it["id"])
                kept.append(it)
        out.append(kept[:n_per_domain])
    return [it for group in zip(*out) for it in group]
