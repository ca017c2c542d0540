# The user program of the launch benchmark: its first line of user code prints the wall
# clock, then it exits. Accepts the --local_rank=N a DeepSpeed-style launcher passes.
import time; print(f"FIRST_LINE {time.time():.6f}", flush=True)  # noqa: E702
