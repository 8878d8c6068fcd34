"""A task image is the task's whole environment: changing any part of the declaration (install, pre-install,
test command, packages, Python) names a new image, an image whose recipe differs from the task's is rebuilt
even under the old tag, and the Docker backend then grades the changed task as the sandbox does."""
import json
import shutil

import pytest

from protege.rollout.tasks import UPSTREAM_DIR, bundled_instance, load_tasks, upstream_tasks

CHANGES = {
    "install": {"install": ""},
    "pre_install": {"pre_install": ["echo prepared > /tmp/prepared"]},
    "test_cmd": {"test_cmd": "python3 -m pytest -rA -p no:cacheprovider -x"},
    "packages": {"packages": ["pytest==8.3.5", "pytest-cov==5.0.0", "setuptools-scm==8.1.1"]},
    "python": {"python": "3.12"},
}


def variant(tmp_path, name: str, change: dict):
    """The upstream semver task with its environment edited in task.json, as a task author would, and its
    row regenerated (the bundled set's own path: bundled_instance)."""
    folder = tmp_path / name
    shutil.copytree(UPSTREAM_DIR / "semver_426", folder / "semver_426")
    meta_path = folder / "semver_426" / "task.json"
    meta = json.loads(meta_path.read_text())
    meta["environment"] = {**meta["environment"], **change}
    meta_path.write_text(json.dumps(meta))
    (folder / "instances.jsonl").write_text(json.dumps(bundled_instance(folder / "semver_426")) + "\n")
    return load_tasks(folder / "instances.jsonl")[0]


def test_every_part_of_the_environment_names_a_new_image(tmp_path):
    original = upstream_tasks()[0]
    tags = {"original": original.image}
    for field, change in CHANGES.items():
        task = variant(tmp_path, field, change)
        assert task.base_commit == original.base_commit
        tags[field] = task.image
    assert len(set(tags.values())) == len(tags), tags   # every change its own tag, none the original's


@pytest.mark.docker
def test_changed_install_rebuilds_and_both_backends_agree(tmp_path, bundled_images, docker_client, sandbox_ready):
    """Removing the install step: Docker builds a new image (also when an image of the old recipe holds the
    new tag), and grades the gold patch as the sandbox, which installs in every workspace, does."""
    from dataclasses import replace

    from protege.rollout.envs.images import RECIPE_LABEL, base_image_name, ensure_task_image
    from protege.rollout.evaluate import evaluate_patch
    original = bundled_images["python-semver__semver-426"]
    changed = variant(tmp_path, "no-install", {"install": ""})
    assert changed.image != original.image
    # The stale case: an image built with the install step sits under the changed task's tag.
    stale = replace(changed, image="protege/task.semver-stale:test")
    docker_client.images.get(original.image).tag("protege/task.semver-stale", "test")
    try:
        ensure_task_image(docker_client, stale, base_image_name(), log=lambda m: None)
        rebuilt = docker_client.images.get(stale.image)
        assert rebuilt.id != docker_client.images.get(original.image).id
        assert rebuilt.labels[RECIPE_LABEL] != docker_client.images.get(original.image).labels[RECIPE_LABEL]
        installed = "python -m pip show -q semver >/dev/null 2>&1 && echo installed || echo absent"
        assert docker_client.containers.run(stale.image, ["bash", "-c", installed], remove=True,
                                            network_mode="none").decode().strip() == "absent"
        graded = {backend: evaluate_patch(stale, stale.patch, backend=backend,
                                          **({"client": docker_client} if backend == "docker" else {}))
                  for backend in ("docker", "sandbox")}
        assert graded["docker"].resolved == graded["sandbox"].resolved, {b: r.log_tail[-800:] for b, r in graded.items()}
        assert graded["docker"].tests_status == graded["sandbox"].tests_status
    finally:
        docker_client.images.remove(stale.image, force=True)
