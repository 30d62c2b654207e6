"""Diffusion: noise schedules, the samplers that step them, and the guided sampling function.

    schedule.py    scheduler_config.json -> betas / alphas_cumprod; the forward process
    samplers.py    make_sampler / sample_loop over the families below
    ddpm.py        DDPM (ancestral) and DDIM steps
    pndm.py        PNDM (PLMS) steps
    dpm_solver.py  DPM-Solver++(2M) steps
    sampling.py    seeded noise, classifier-free guidance, the jitted sampling loop
"""
