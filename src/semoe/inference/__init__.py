"""semoe.inference"""
