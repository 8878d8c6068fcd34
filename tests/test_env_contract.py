"""What every Environment backend must do alike (the Docker tests skip with a reason without Docker)."""
import pytest

from protege.rollout.envs.base import Environment
from protege.rollout.tasks import bundled_tasks

TASK_ID = "protege__leap_year-1"


@pytest.fixture(params=["docker", "sandbox"])
def env(request, tmp_path):
    if request.param == "docker":
        task = request.getfixturevalue("bundled_images")[TASK_ID]
        from protege.rollout.envs.docker import DockerEnvironment
        environment = DockerEnvironment(task, client=request.getfixturevalue("docker_client"), timeout=30,
                                        output_cap=1000)
    else:
        request.getfixturevalue("sandbox_ready")
        task = next(t for t in bundled_tasks() if t.instance_id == TASK_ID)
        from protege.rollout.envs.sandbox import SandboxEnvironment
        environment = SandboxEnvironment(task, workdir=str(tmp_path), timeout=30, output_cap=1000)
    with environment:
        yield environment


def test_protocol_and_starting_state(env):
    assert isinstance(env, Environment)
    assert env.run("pwd").output.strip() == env.repo_dir
    assert env.repo_dir in ("/testbed", "/tmp/testbed")  # fixed: prompts never show a host path
    assert env.run("git rev-parse HEAD").output.strip() == env.task.base_commit
    assert env.run("git status --porcelain").output == ""
    assert env.diff() == ""


def test_exit_codes_and_output_cap(env):
    result = env.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.timed_out, result.truncated) == (3, False, False)
    assert set(result.output.split()) == {"out", "err"}
    big = env.run("python3 -c \"print('a' * 5000 + 'END')\"")
    assert big.truncated and big.exit_code == 0
    assert big.output.startswith("a" * 500) and big.output.rstrip().endswith("END")
    assert len(big.output) < 1100  # the cap (1000 bytes) plus the elision note
