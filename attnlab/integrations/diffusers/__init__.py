"""attnlab's controls on the stock diffusers pipelines (SD 1.x/2.x, SDXL, PixArt, SD3, Flux).

    from attnlab.attention import control
    from attnlab.control import PAG, HeatMaps
    maps = HeatMaps()
    with control(pipe, [PAG(scale=3.0, layers="mid_block"), maps]):
        image = pipe("a red car", num_inference_steps=25, generator=g).images[0]

The pipeline's own `__call__` runs: one processor per selected attention module adapts diffusers'
call to the bus, a wrapper on the denoiser tells the bus the step and the batch layout and folds
guidance terms into the pipeline's CFG, and a wrapper on the scheduler counts steps and hands
latent updates to the pipeline's latents. Everything is restored when the scope ends.
"""

from attnlab.integrations.diffusers.host import control, hosted_layers, hosts

__all__ = ["control", "hosted_layers", "hosts"]
