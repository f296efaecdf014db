"""What the training loop needs beside the loop itself: checkpoints to resume bit for bit
(`checkpoint`), peak memory of one method (`memory`), and how much of the machine other
processes took while we measured (`machine_load`)."""
