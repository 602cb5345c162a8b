"""vinn.deterministic: every form torch.no_grad has, local to the thread and to the asyncio task."""

import asyncio
import threading

import pytest
import torch

import vinn
from vinn.sampling import sampling_enabled


def test_forms_of_use():
    @vinn.deterministic
    def bare():
        return sampling_enabled()

    @vinn.deterministic()
    def called():
        return sampling_enabled()

    assert bare() is False and called() is False
    assert sampling_enabled()
    switch = vinn.deterministic()
    for _ in range(2):  # one object, entered again and nested
        with switch:
            with switch:
                assert not sampling_enabled()
            assert not sampling_enabled()
        assert sampling_enabled()


def test_holds_inside_a_decorated_generator_and_not_between_its_yields():
    @vinn.deterministic
    def generate():
        for _ in range(3):
            yield sampling_enabled()

    seen = []
    for inside in generate():
        seen.append((inside, sampling_enabled()))
    assert seen == [(False, True)] * 3


def test_exits_on_an_exception():
    with pytest.raises(RuntimeError):
        with vinn.deterministic():
            raise RuntimeError
    assert sampling_enabled()


def test_is_local_to_the_asyncio_task():
    async def inside():
        with vinn.deterministic():
            await asyncio.sleep(0.01)  # the other task runs meanwhile
            return sampling_enabled()

    async def outside():
        await asyncio.sleep(0.005)
        return sampling_enabled()

    @vinn.deterministic
    async def decorated():
        await asyncio.sleep(0)
        return sampling_enabled()

    async def main():
        return await asyncio.gather(inside(), outside(), decorated())

    assert asyncio.run(main()) == [False, True, False]


def test_is_local_to_the_thread():
    seen = []
    with vinn.deterministic():
        thread = threading.Thread(target=lambda: seen.append(sampling_enabled()))
        thread.start()
        thread.join()
    assert seen == [True]


def test_layers_follow_it():
    layer = vinn.Linear(3, 2)
    x = torch.randn(4, 3)

    @vinn.deterministic
    def mean():
        return layer(x)

    torch.testing.assert_close(mean(), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("argument", [5, "yes", None])
def test_decorating_a_non_function_is_a_type_error(argument):
    if argument is None:  # deterministic(None) is deterministic()
        assert isinstance(vinn.deterministic(None), vinn.deterministic)
        return
    with pytest.raises(TypeError, match="vinn.deterministic's argument must be a function"):
        vinn.deterministic(argument)
