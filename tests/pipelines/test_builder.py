"""The builder writes nothing onto the processors it builds; a processor's stats key is the plan's."""

import textwrap
from types import SimpleNamespace

from pipelines import builder, config
from pipelines.server import call_stats

DEPLOYMENT = """\
transport: {type: exotel}
processors:
  - type: pipecat.processors.filters.identity_filter.IdentityFilter
    name: passthrough
  - type: barge_in
  - type: barge_in
    name: second_guard
  - type: pipecat.processors.filters.identity_filter.IdentityFilter
"""


def test_processors_carry_no_attribute_of_ours_and_stats_take_the_plans_names(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT))
    deployment = builder.plan(config.load(path, {}))
    processors = builder.new_call_processors(deployment, None)
    assert not any(hasattr(p, "registry_name") for p in processors)  # a third-party class is not ours to patch
    assert deployment.stats_names() == [
        "passthrough", "barge_in", "second_guard", "pipecat.processors.filters.identity_filter.IdentityFilter"]
    for p in processors:
        p.stats = {"id": id(p)}  # every one reports, so every key shows
    output = SimpleNamespace(stats={}, messages_sent=0)
    stats = call_stats(processors, output, deployment.stats_names())
    assert [key for key in stats if key != "output"] == deployment.stats_names()
    assert [stats[key]["id"] for key in deployment.stats_names()] == [id(p) for p in processors]
    # built outside a plan: the class name, numbered on a clash, as before
    assert list(call_stats(processors[1:3], output)) == ["output", "BargeInProcessor", "BargeInProcessor2"]
