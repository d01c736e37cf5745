"""HiLight on the engines the field uses: vLLM (serving) and Ray Data (batch inference)."""
