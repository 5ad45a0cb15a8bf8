"""The commands of README.md and examples/README.md, run: a README command that fails, fails the tests.

Every command in a ```bash block is run, except the setup ones (apt-get, venv, pip, pytest itself), with flags
that keep it cheap and its files out of the checkout: `run` gets `--max-new-tokens 4` (agent tasks also
`--max-steps 1`) and a trace in a temporary folder; each eval gets the small sizes in CHEAP_EVAL (a README eval
without an entry fails the test: add one). Commands that need data the user supplies are in ```text blocks.
The agentloop commands run in one process (`cli_batch`); examples/*.py run as their own process.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SETUP = ("apt-get", "python3", "pip", ".", "source")
CHEAP_EVAL = {
    "decode-speed": ["--contexts", "64", "--new-tokens", "2", "--rounds", "1", "--no-write"],
    "ingestion": ["--trials", "1", "--min-tokens", "150", "--max-tokens", "150", "--ratios", "2", "--long-trials", "0",
                  "--answer-tokens", "2", "--max-queries", "256", "--no-write"],
}


def readme_commands() -> list[list[str]]:
    commands = []
    for doc in (REPO / "README.md", REPO / "examples" / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                for part in line.split("&&"):
                    argv = shlex.split(part, comments=True)
                    if argv and argv[0] not in SETUP and argv[:3] != ["python", "-m", "pytest"]:
                        commands.append(argv)
    return commands


def cheap(argv: list[str], tmp: Path, k: int) -> list[str]:
    if argv[1] == "run":
        extra = ["--max-new-tokens", "4", "--trace", str(tmp / f"trace-{k}.jsonl")]
        task = yaml.safe_load((REPO / argv[2]).read_text())
        if task.get("tools"):
            extra += ["--max-steps", "1"] + ([] if task.get("workspace") else ["--workspace", str(tmp / f"ws-{k}")])
            (tmp / f"ws-{k}").mkdir()
        return argv[1:] + extra
    if argv[1] == "eval" and argv[2] != "--help":
        assert argv[2] in CHEAP_EVAL, f"README runs `agentloop eval {argv[2]}`: add its cheap flags to CHEAP_EVAL"
        return argv[1:] + CHEAP_EVAL[argv[2]]
    return argv[1:]


def test_the_readme_commands_run(tmp_path, cli_batch):
    commands = readme_commands()
    agentloop = [argv for argv in commands if argv[0] == "agentloop"]
    scripts = [argv for argv in commands if argv[0] == "python"]
    assert len(agentloop) >= 10 and scripts and len(agentloop) + len(scripts) == len(commands), commands
    results = cli_batch([cheap(argv, tmp_path, k) for k, argv in enumerate(agentloop)], REPO)
    failed = [f"{shlex.join(r['argv'])}: exit {r['code']}\n{r['stderr'][-1500:]}" for r in results if r["code"] != 0]
    assert not failed, "\n".join(failed)
    assert "decode-speed" in next(r["stdout"] for r in results if r["argv"] == ["eval", "--help"])
    for argv in scripts:
        done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{shlex.join(argv)}: exit {done.returncode}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
