"""Environments at scale, against real components the tests start: a local registry and two Docker daemons
of their own. prepare pulls a registry image onto both hosts; a missing image refuses a run, named; a host
killed in the middle of a rollout loses no trajectory (each is run again on the other, counted as the
infrastructure's, never trained on as a failure) and leaves no container; a run killed with -9 leaves
nothing the next start's sweep does not remove."""
import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from docker_fixtures import protege_containers

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def registry_task(bundled_images, docker_client, local_registry):
    """The leap_year task, its image pushed to the local registry under a registry name (a task used as it
    is, as a SWE-bench one would be: no bundled source)."""
    task = bundled_images["protege__leap_year-1"]
    repository = f"{local_registry}/protege/leap-year"
    tag = task.image.rsplit(":", 1)[1]
    image = docker_client.images.get(task.image)
    image.tag(repository, tag)
    image.tag(repository, "second")   # the same layers under another name (the disk budget test's)
    try:
        for name in ("second", tag):
            for event in docker_client.api.push(repository, tag=name, stream=True, decode=True):
                assert "error" not in event, event
    finally:
        for name in (tag, "second"):
            docker_client.images.remove(f"{repository}:{name}")
    return replace(task, image=f"{repository}:{tag}", source=None)


def task_row(task) -> dict:
    """A task file row for a task used as it is (its image, no bundled source)."""
    return {"instance_id": task.instance_id, "repo": task.repo, "base_commit": task.base_commit,
            "problem_statement": task.problem_statement, "patch": task.patch, "test_patch": task.test_patch,
            "FAIL_TO_PASS": list(task.fail_to_pass), "PASS_TO_PASS": list(task.pass_to_pass), "image": task.image}


def _has(client, image: str) -> bool:
    try:
        client.images.get(image)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def hosts(docker_pair, registry_task):
    """Both daemons with the registry task's image, pulled by prepare (the first test checks how)."""
    from protege.rollout.envs.prepare import PrepareConfig, prepare_images
    clients = [d.client() for d in docker_pair]
    assert not any(_has(c, registry_task.image) for c in clients)   # absent from both hosts at first
    messages = []
    reports = prepare_images([registry_task], PrepareConfig(hosts=[d.url for d in docker_pair]), log=messages.append)
    return docker_pair, clients, reports, messages


def test_prepare_pulls_a_registry_image_onto_every_host(hosts, registry_task, local_registry, tmp_path, capsys):
    daemons, clients, reports, messages = hosts
    assert [r.pulled for r in reports] == [[registry_task.image]] * 2
    assert all(not r.missing and not r.present for r in reports)
    assert all(_has(c, registry_task.image) for c in clients)
    assert any(m.endswith(f"pulled {registry_task.image}") for m in messages)
    # Resumable: a second run (the command, as a user runs it) finds both present and pulls nothing.
    from protege.rollout.envs.prepare import PrepareConfig, main, prepare_images
    (tmp_path / "tasks.jsonl").write_text(json.dumps(task_row(registry_task)) + "\n")
    assert main(["--tasks", str(tmp_path / "tasks.jsonl"), "--hosts", *[d.url for d in daemons]]) == 0
    summary = capsys.readouterr().out
    assert summary.count(": 1 present, 0 pulled, 0 built, 0 copied, 0 missing") == 2, summary
    # A disk budget too small for one more image: nothing is pulled, and the summary says why.
    second = replace(registry_task, instance_id="second", image=f"{local_registry}/protege/leap-year:second")
    tight = prepare_images([second], PrepareConfig(hosts=[daemons[0].url], disk_budget=1), log=lambda m: None)
    assert "over the disk budget" in tight[0].missing[second.image] and not _has(clients[0], second.image)


def test_a_missing_image_is_refused_before_any_trajectory(hosts, registry_task, local_registry, tmp_path, capsys):
    """require_images (what GRPO and evaluation call at start) names each missing image, its task and host;
    the evaluation command refuses the run before writing anything (the GRPO side: tests/test_rl.py)."""
    from protege.rollout.envs.prepare import MissingImages, require_images
    daemons = hosts[0]
    absent = replace(registry_task, instance_id="absent-task", image=f"{local_registry}/protege/absent:0")
    with pytest.raises(MissingImages) as refused:
        require_images([registry_task, absent], [d.url for d in daemons], pull=False, log=lambda m: None)
    message = str(refused.value)
    assert message.count(f"{absent.image} (task absent-task)") == 2 and registry_task.image not in message
    (tmp_path / "tasks.jsonl").write_text(json.dumps(task_row(absent)) + "\n")
    from protege.rollout.evaluate_agent import main
    code = main(["--tasks", str(tmp_path / "tasks.jsonl"), "--policy", "empty", "--backend", "docker",
                 "--docker-hosts", *[d.url for d in daemons], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{absent.image} (task absent-task)" in err, err
    assert not (tmp_path / "out" / "results.jsonl").exists()


class GatedPolicy:
    """A scripted policy whose first turn waits at a gate: the test kills a host while every trajectory is
    in flight. A copy (the rerun of a lost trajectory) starts its script from the beginning."""

    def __init__(self, inner, gate: threading.Event, arrived: list):
        self.inner, self.gate, self.arrived, self.name = inner, gate, arrived, inner.name
        self._waited = False

    def __copy__(self):
        return GatedPolicy(copy.copy(self.inner), self.gate, self.arrived)

    def act(self, messages, conversation, max_new_tokens):
        if not self._waited:
            self._waited = True
            self.arrived.append(1)
            assert self.gate.wait(120)
        return self.inner.act(messages, conversation, max_new_tokens)


def test_a_host_killed_mid_rollout_loses_no_trajectory_and_leaks_nothing(hosts, registry_task, tmp_path):
    from protege.engine.tokenizer import train_bpe_tokenizer
    from protege.rollout.agent.loop import AgentConfig, Job, run_batch
    from protege.rollout.agent.oracle import OracleExpert
    from protege.rollout.agent.policies import ScriptedPolicy, gold_patch_steps
    from protege.rollout.collect import SCRIPTED_TEST_COMMAND
    from protege.rollout.envs.fleet import Fleet, FleetConfig
    daemons, clients, _, _ = hosts
    gate, arrived = threading.Event(), []
    jobs = [Job(registry_task, GatedPolicy(ScriptedPolicy(gold_patch_steps(registry_task, SCRIPTED_TEST_COMMAND)),
                                           gate, arrived), attempt=i) for i in range(4)]
    fleet = Fleet(FleetConfig(docker_hosts=[d.url for d in daemons], max_envs_per_host=2, warm_envs=0),
                  [registry_task], log=lambda m: None)
    fleet.pool.config.probe_interval_s = 0.5
    results = {}
    tokenizer = train_bpe_tokenizer(["fix the leap year bug"] * 4, 300, tmp_path / "tokenizer")

    def rollout():
        results["trajectories"] = run_batch(
            jobs, fleet.open, OracleExpert(), tokenizer, AgentConfig(max_steps=20, judge=False),
            concurrency=4, evaluate=lambda task, patch: fleet.evaluate(task, patch).to_dict())
    worker = threading.Thread(target=rollout)
    try:
        worker.start()
        deadline = time.monotonic() + 120
        while len(arrived) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(arrived) == 4, "the trajectories did not all start"
        assert [h["active"] for h in fleet.pool.status()] == [2, 2]   # least-loaded placement
        daemons[1].kill()   # host b dies with two trajectories in flight
        gate.set()
        worker.join(300)
        assert not worker.is_alive()
        trajectories = results["trajectories"]
        # GRPO's test of a trajectory the policy owns (rl._training_samples): no infrastructure_error.
        assert [t.infrastructure_error for t in trajectories] == [None] * 4
        assert all(t.resolved for t in trajectories), [t.evaluation for t in trajectories]
        assert sum(len(t.infrastructure_restarts) for t in trajectories) == 2   # b's two, run again on a
        assert all(r.startswith("environment lost") for t in trajectories for r in t.infrastructure_restarts)
        assert not fleet.pool.status()[1]["healthy"] and fleet.pool.status()[1]["orphans"] == 2
        # b comes back: the probe sees it, removes the containers it kept, and b rejoins the rotation.
        daemons[1].start()
        deadline = time.monotonic() + 60
        while not fleet.pool.status()[1]["healthy"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fleet.pool.status()[1] == {**fleet.pool.status()[1], "healthy": True, "orphans": 0}
    finally:
        gate.set()
        worker.join(60)
        fleet.close()
        if daemons[1].process.poll() is not None:
            daemons[1].start()
    assert [protege_containers(d.client()) for d in daemons] == [[], []]


def test_a_run_killed_with_sigkill_leaves_nothing_the_next_start_keeps(hosts, registry_task, tmp_path):
    """A process with a warm pool is killed with -9: its waiting containers stay behind until the next start's
    sweep removes them -- and only them: a container without the engine's labels is left alone."""
    daemons, clients = hosts[0], hosts[1]
    client = clients[0]
    with open(tmp_path / "task.pickle", "wb") as f:
        pickle.dump(registry_task, f)
    script = f"""
import pickle
import time
from protege.rollout.envs.hosts import HostPool, HostPoolConfig
from protege.rollout.envs.warm import WarmPool, WarmPoolConfig
task = pickle.load(open({str(tmp_path / "task.pickle")!r}, "rb"))
pool = HostPool(HostPoolConfig(hosts=[{daemons[0].url!r}]))
warm = WarmPool(pool.open, WarmPoolConfig(size=2))
warm.schedule([task, task])
while sum(len(v) for v in warm._ready.values()) < 2:
    time.sleep(0.1)
print("ready", flush=True)
time.sleep(600)
"""
    other = client.containers.create(registry_task.image, ["sleep", "600"], labels={"someone.else": "1"},
                                     network_mode="none")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(protege_containers(client)) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(protege_containers(client)) == 2   # -9: no atexit, nothing removed them
        from protege.rollout.envs.sweep import sweep_dead_runs
        assert len(sweep_dead_runs(client, log=lambda m: None)) == 2
        assert protege_containers(client) == []
        assert client.containers.get(other.id)   # not ours: untouched
    finally:
        if proc.poll() is None:
            proc.kill()
        other.remove(force=True)

